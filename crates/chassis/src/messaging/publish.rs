//! Publishing: one event, its headers, the broker's acknowledgement.

use std::{fmt, future::Future, pin::Pin, sync::Arc, time::Duration};

use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use bytes::Bytes;
use http::HeaderValue;

use super::{
    MessagingConfig, MessagingError,
    headers::{self, AUTHORIZATION, CONTENT_TYPE, JSON},
    subject::{Subject, stream_name, version_filter},
};
use crate::{
    client::{TokenError, TokenSource},
    context::{CorrelationId, TraceContext},
    otel::Span,
};

/// Where a publisher gets its own `Authorization` value: the service's
/// token, which consumers verify. [`TokenSource`] (the client-credentials
/// grant) is the production one; [`StaticToken`] holds a fixed value.
pub trait PublisherToken: Send + Sync + 'static {
    /// `Bearer <token>`.
    fn authorization(
        &self,
    ) -> Pin<Box<dyn Future<Output = Result<HeaderValue, TokenError>> + Send + '_>>;
}

impl PublisherToken for TokenSource {
    fn authorization(
        &self,
    ) -> Pin<Box<dyn Future<Output = Result<HeaderValue, TokenError>> + Send + '_>> {
        Box::pin(TokenSource::authorization(self))
    }
}

/// A fixed token, for tests and for tokens managed outside the chassis.
#[derive(Clone)]
pub struct StaticToken(HeaderValue);

impl StaticToken {
    /// Sends `Bearer <token>`.
    ///
    /// # Panics
    ///
    /// When `token` is not a valid header value (a test's mistake).
    pub fn bearer(token: &str) -> Self {
        let mut value =
            HeaderValue::from_str(&format!("Bearer {token}")).expect("a token is header-safe");
        value.set_sensitive(true);
        Self(value)
    }
}

impl fmt::Debug for StaticToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StaticToken([redacted])")
    }
}

impl PublisherToken for StaticToken {
    fn authorization(
        &self,
    ) -> Pin<Box<dyn Future<Output = Result<HeaderValue, TokenError>> + Send + '_>> {
        let value = self.0.clone();
        Box::pin(async move { Ok(value) })
    }
}

/// One event to publish: its subject, its id, its payload, and the request
/// it came from (correlation id, trace).
#[derive(Debug, Clone)]
pub struct OutgoingEvent {
    subject: Subject,
    id: String,
    payload: Bytes,
    content_type: HeaderValue,
    correlation_id: CorrelationId,
    trace: Option<TraceContext>,
}

impl OutgoingEvent {
    /// An event with a JSON payload. `id` is the event's id, unique per
    /// event (the outbox row's): it becomes `Nats-Msg-Id`, so a re-publish
    /// of the same event is dropped by the stream.
    ///
    /// # Errors
    ///
    /// When `id` is not 1 to 128 characters of `[A-Za-z0-9._~:-]`, or the
    /// payload does not serialize.
    pub fn json(
        subject: Subject,
        id: &str,
        payload: &impl serde::Serialize,
    ) -> Result<Self, MessagingError> {
        let payload = serde_json::to_vec(payload)
            .map_err(|e| MessagingError::Payload(e.to_string()))?
            .into();
        Self::bytes(subject, id, payload, JSON)
    }

    /// An event whose payload is already encoded, with its content type.
    ///
    /// # Errors
    ///
    /// When `id` is not a valid event id.
    pub fn bytes(
        subject: Subject,
        id: &str,
        payload: Bytes,
        content_type: &str,
    ) -> Result<Self, MessagingError> {
        if !headers::is_event_id(id) {
            return Err(MessagingError::EventId);
        }
        let content_type = HeaderValue::from_str(content_type)
            .map_err(|_| MessagingError::Payload("invalid content type".to_owned()))?;
        Ok(Self {
            subject,
            id: id.to_owned(),
            payload,
            content_type,
            correlation_id: CorrelationId::generate(),
            trace: None,
        })
    }

    /// The correlation id of the request that made the event (default: a
    /// new one).
    pub fn correlation_id(mut self, id: CorrelationId) -> Self {
        self.correlation_id = id;
        self
    }

    /// The trace the event continues: the context the outbox stored with
    /// it (see [`TraceContext::from_traceparent`]).
    pub fn trace(mut self, trace: TraceContext) -> Self {
        self.trace = Some(trace);
        self
    }

    /// The subject.
    pub fn subject(&self) -> &Subject {
        &self.subject
    }

    /// The event id.
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// What the broker said about a published event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The stream that stored it.
    pub stream: String,
    /// Its sequence number in the stream (the first copy's, for a
    /// duplicate).
    pub sequence: u64,
    /// Whether the stream had it already (same `Nats-Msg-Id` within the
    /// duplicate window): nothing new was stored.
    pub duplicate: bool,
}

/// Publishes a service's events to its stream; see the
/// [module docs](super). Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

struct Inner {
    js: jetstream::Context,
    service: String,
    stream: String,
    token: Box<dyn PublisherToken>,
}

impl fmt::Debug for Publisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publisher")
            .field("service", &self.inner.service)
            .field("stream", &self.inner.stream)
            .finish_non_exhaustive()
    }
}

impl Publisher {
    /// A publisher of `service`'s events in `versions` (e.g. `&[1]`, or
    /// `&[1, 2]` while two versions are published side by side). Creates or
    /// updates the service's stream `<service>-events`, capturing
    /// `<service>.v<N>.>` for each version, on file storage with the
    /// configured duplicate window: idempotent, so every replica does it at
    /// start-up. Each event carries `token`'s `Authorization`.
    ///
    /// # Errors
    ///
    /// An invalid service name or version, or a broker that refused the
    /// stream (or cannot be reached).
    pub async fn new(
        client: async_nats::Client,
        config: &MessagingConfig,
        service: &str,
        versions: &[u32],
        token: impl PublisherToken,
    ) -> Result<Self, MessagingError> {
        if !crate::permission::is_name(service) {
            return Err(MessagingError::Declaration(vec![format!(
                "publisher `{service}`: not a valid service name"
            )]));
        }
        if versions.is_empty() || versions.contains(&0) {
            return Err(MessagingError::Declaration(vec![format!(
                "publisher `{service}`: versions must be at least 1, and one at least"
            )]));
        }
        let js = jetstream::context::ContextBuilder::new()
            .timeout(Self::ACK_TIMEOUT)
            .build(client);
        let stream = stream_name(service);
        js.create_or_update_stream(stream::Config {
            name: stream.clone(),
            subjects: versions
                .iter()
                .map(|v| version_filter(service, *v))
                .collect(),
            storage: stream::StorageType::File,
            duplicate_window: config.duplicate_window,
            description: Some(format!("events published by {service}")),
            ..Default::default()
        })
        .await
        .map_err(|e| MessagingError::Broker(format!("stream {stream}: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                js,
                service: service.to_owned(),
                stream,
                token: Box::new(token),
            }),
        })
    }

    /// The stream events go to.
    pub fn stream(&self) -> &str {
        &self.inner.stream
    }

    /// Publishes `event` and waits for the stream's acknowledgement: only
    /// then is it stored (an outbox relay marks its row sent after this
    /// returns `Ok`, and retries it otherwise). A re-published event (same
    /// id within the duplicate window) is acknowledged as a
    /// [duplicate](Published::duplicate) and stored once.
    ///
    /// # Errors
    ///
    /// A subject of another service, no token, a broker that did not
    /// acknowledge in time or refused the event. Each is safe to retry.
    pub async fn publish(&self, event: &OutgoingEvent) -> Result<Published, MessagingError> {
        let result = self.send(event).await;
        let outcome = match &result {
            Ok(p) if p.duplicate => "duplicate",
            Ok(_) => "published",
            Err(_) => "error",
        };
        metrics::counter!(
            "messaging_published_total",
            "service" => crate::metrics::service_label(),
            "stream" => self.inner.stream.clone(),
            "outcome" => outcome,
        )
        .increment(1);
        result
    }

    async fn send(&self, event: &OutgoingEvent) -> Result<Published, MessagingError> {
        if event.subject.service() != self.inner.service {
            return Err(MessagingError::Declaration(vec![format!(
                "{} is not a subject of {}",
                event.subject, self.inner.service
            )]));
        }
        let parent = event
            .trace
            .clone()
            .unwrap_or_else(TraceContext::new_unrecorded_root);
        let mut span = Span::producer(&parent, format!("send {}", event.subject.event()));
        span.set_attribute("messaging.system", "nats");
        span.set_attribute("messaging.operation.type", "send");
        span.set_attribute("messaging.destination.name", event.subject.to_string());
        span.set_attribute("messaging.message.id", event.id.clone());
        let authorization = self
            .inner
            .token
            .authorization()
            .await
            .map_err(|e| MessagingError::Token(e.to_string()));
        let authorization = match authorization {
            Ok(a) => a,
            Err(e) => {
                span.set_error("token");
                return Err(e);
            }
        };
        let mut h = async_nats::HeaderMap::new();
        h.insert(async_nats::header::NATS_MESSAGE_ID, event.id.as_str());
        h.insert(headers::X_CORRELATION_ID, event.correlation_id.as_str());
        h.insert(
            headers::TRACEPARENT,
            header_text(&span.trace().traceparent()),
        );
        if let Some(state) = span.trace().tracestate() {
            h.insert(headers::TRACESTATE, header_text(state));
        }
        h.insert(AUTHORIZATION, header_text(&authorization));
        h.insert(CONTENT_TYPE, header_text(&event.content_type));
        let ack = match self
            .inner
            .js
            .publish_with_headers(event.subject.to_string(), h, event.payload.clone())
            .await
        {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match ack {
            Ok(ack) => Ok(Published {
                stream: ack.stream,
                sequence: ack.sequence,
                duplicate: ack.duplicate,
            }),
            Err(e) => {
                let kind = match e.kind() {
                    PublishErrorKind::TimedOut => "timeout",
                    PublishErrorKind::StreamNotFound => "no_stream",
                    PublishErrorKind::BrokenPipe => "disconnected",
                    _ => "broker",
                };
                span.set_error(kind);
                Err(MessagingError::Broker(format!(
                    "event {} on {} not acknowledged: {e}",
                    event.id, event.subject
                )))
            }
        }
    }

    /// How long [`publish`](Self::publish) waits for an acknowledgement.
    pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);
}

/// A header value as NATS header text; the chassis only sends values it
/// made or validated, which are visible ASCII.
fn header_text(value: &HeaderValue) -> &str {
    value.to_str().unwrap_or_default()
}
