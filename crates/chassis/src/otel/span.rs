//! The spans the chassis records: [`Span`], begun when work starts and
//! recorded when it ends.

use std::{borrow::Cow, fmt, sync::LazyLock, time::SystemTime};

use opentelemetry::{
    InstrumentationScope, KeyValue, Value,
    trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState},
};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};

use crate::context::TraceContext;

/// The chassis as the instrumentation scope of its spans.
static SCOPE: LazyLock<InstrumentationScope> = LazyLock::new(|| {
    InstrumentationScope::builder("chassis")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build()
});

/// One span of a trace: a request served, a call made, a transaction, a
/// step of a handler. Recorded when dropped (or [`end`](Self::end)ed), and
/// only when the trace is sampled and a pipeline exports; otherwise every
/// method is a branch on a `None`.
///
/// Work done inside the span (a call to another service, a child span)
/// takes its context from [`trace`](Self::trace).
pub struct Span {
    trace: TraceContext,
    recording: Option<Box<Recording>>,
}

/// What a recorded span keeps until it ends.
struct Recording {
    name: Cow<'static, str>,
    kind: SpanKind,
    remote_parent: bool,
    start: SystemTime,
    attributes: Vec<KeyValue>,
    status: Status,
}

impl fmt::Debug for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Span")
            .field("trace", &self.trace)
            .field("recording", &self.recording.is_some())
            .finish()
    }
}

// === impl Span ===

impl Span {
    /// A span of kind `internal` inside `parent`: a step of a handler.
    pub fn internal(parent: &TraceContext, name: impl Into<Cow<'static, str>>) -> Self {
        Self::child_of(parent, SpanKind::Internal, name)
    }

    /// A span of kind `client` inside `parent`: a call this service makes,
    /// to a database say (the downstream client records its own).
    pub fn client(parent: &TraceContext, name: impl Into<Cow<'static, str>>) -> Self {
        Self::child_of(parent, SpanKind::Client, name)
    }

    /// A span of kind `client` inside `parent` for a storage transaction:
    /// named `operation`, with `db.system.name` (`sqlite`, `postgresql`)
    /// and `db.operation.name`. Mark it failed with
    /// [`set_error`](Self::set_error) when the transaction does not commit.
    pub fn storage(parent: &TraceContext, system: &'static str, operation: &'static str) -> Self {
        let mut span = Self::child_of(parent, SpanKind::Client, operation);
        span.set_attribute("db.system.name", system);
        span.set_attribute("db.operation.name", operation);
        span
    }

    /// A span of kind `consumer` continuing `parent`, the context stored with
    /// queued work (see [`TraceContext::from_traceparent`]): the work's span
    /// is a child of the span that queued it.
    pub fn consumer(parent: &TraceContext, name: impl Into<Cow<'static, str>>) -> Self {
        Self::child_of(parent, SpanKind::Consumer, name)
    }

    /// A span of kind `producer` inside `parent`: a message this service
    /// hands to a broker. The message carries this span's
    /// [`traceparent`](TraceContext::traceparent), so its consumer's span is
    /// a child of it.
    pub fn producer(parent: &TraceContext, name: impl Into<Cow<'static, str>>) -> Self {
        Self::child_of(parent, SpanKind::Producer, name)
    }

    fn child_of(parent: &TraceContext, kind: SpanKind, name: impl Into<Cow<'static, str>>) -> Self {
        Self::begin(parent.child(), kind, false, name, SystemTime::now())
    }

    /// The span `trace` names itself (its span id, its parent), begun at
    /// `start`: how the request and call steps record theirs.
    pub(crate) fn begin(
        trace: TraceContext,
        kind: SpanKind,
        remote_parent: bool,
        name: impl Into<Cow<'static, str>>,
        start: SystemTime,
    ) -> Self {
        let recording = (trace.sampled() && super::enabled()).then(|| {
            Box::new(Recording {
                name: name.into(),
                kind,
                remote_parent,
                start,
                attributes: Vec::new(),
                status: Status::Unset,
            })
        });
        Self { trace, recording }
    }

    /// The context of this span, for work inside it.
    pub fn trace(&self) -> &TraceContext {
        &self.trace
    }

    /// Whether the span will be exported.
    pub fn is_recording(&self) -> bool {
        self.recording.is_some()
    }

    /// Sets an attribute (OpenTelemetry semantic conventions name them:
    /// `db.system.name`, `db.operation.name`, ...).
    pub fn set_attribute(&mut self, key: &'static str, value: impl Into<Value>) {
        if let Some(r) = &mut self.recording {
            r.attributes.push(KeyValue::new(key, value));
        }
    }

    /// Marks the span failed: `error.type` is set to `error_type` (a low
    /// cardinality name such as `timeout` or `500`), and the status to
    /// error.
    pub fn set_error(&mut self, error_type: impl Into<Cow<'static, str>>) {
        if let Some(r) = &mut self.recording {
            let error_type = error_type.into();
            r.attributes
                .push(KeyValue::new("error.type", Value::from(error_type.clone())));
            r.status = Status::Error {
                description: error_type,
            };
        }
    }

    /// Renames the span, when what it did is known only at its end.
    pub fn set_name(&mut self, name: impl Into<Cow<'static, str>>) {
        if let Some(r) = &mut self.recording {
            r.name = name.into();
        }
    }

    /// Ends the span now.
    pub fn end(self) {}

    /// Ends the span at `end`.
    fn record(&mut self, end: SystemTime) {
        let Some(r) = self.recording.take() else {
            return;
        };
        let Recording {
            name,
            kind,
            remote_parent,
            start,
            attributes,
            status,
        } = *r;
        let (trace_id, span_id, parent, _) = self.trace.raw();
        let state = self
            .trace
            .tracestate()
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or(TraceState::NONE);
        super::record(SpanData {
            span_context: SpanContext::new(
                TraceId::from_bytes(trace_id),
                SpanId::from_bytes(span_id),
                TraceFlags::SAMPLED,
                false,
                state,
            ),
            parent_span_id: parent.map_or(SpanId::INVALID, SpanId::from_bytes),
            parent_span_is_remote: remote_parent && parent.is_some(),
            span_kind: kind,
            name,
            start_time: start,
            end_time: end.max(start),
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status,
            instrumentation_scope: SCOPE.clone(),
        });
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if self.recording.is_some() {
            self.record(SystemTime::now());
        }
    }
}
