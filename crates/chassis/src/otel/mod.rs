//! Distributed tracing: a span for every request served, every attempt at a
//! call, every storage transaction and every piece of queued work, exported
//! over OTLP.
//!
//! # The standard
//!
//! A service takes part in the traces that cross it, so that where a slow
//! or failed call spent its time can be seen across services:
//!
//! * **a server span per API request** (the standard endpoints, probed and
//!   scraped every few seconds, start none), named after the method and the route
//!   template (`POST /orders/v1/{account}/orders`), with the OpenTelemetry
//!   HTTP attributes: `http.request.method`, `http.route`,
//!   `http.response.status_code`, `url.scheme`, `server.address`,
//!   `server.port`, and `error.type` on a 5xx (the status code);
//! * **a client span per attempt** at a call to another service, so a retry
//!   shows as a second span under the same work; the `traceparent` each
//!   attempt sends names that attempt's span, and `tracestate` is passed on
//!   unchanged; a failed attempt carries `error.type` (the status code,
//!   `timeout` or `connection`);
//! * **a span per storage transaction and per piece of queued work**, made
//!   with [`Span`] ([`Span::client`] around a transaction,
//!   [`Span::consumer`] for work taken from a queue or an outbox);
//! * every log line written for a request carries its `trace_id` and its
//!   `span_id` (the server span), and every audit event its `trace_id`;
//! * queued work continues the trace of the request that queued it: the
//!   queue stores the request's [`traceparent`](crate::context::TraceContext::traceparent)
//!   and the worker's span is its **child**
//!   ([`TraceContext::from_traceparent`]), so one trace shows the customer's
//!   call, the outbox relay and the mail sent. A child rather than a span
//!   link: the work is done for that request and nothing else, and tracing
//!   UIs draw a child in the request's tree but a link only as a reference.
//!
//! **Sampling** is decided once, where a trace starts, and travels in the
//! `traceparent` flags: by default a service samples the traces it starts
//! at `OTEL_TRACES_SAMPLER_ARG` (1.0 unless set) and follows its caller's
//! decision for the traces it continues (`parentbased_traceidratio`). So
//! with a ratio of 0 at the edge nothing is recorded anywhere behind it,
//! and a sampled caller gets every hop. A service that exports nothing
//! samples none of the traces it starts, and asks nobody behind it to.
//!
//! **Export never slows a request.** Finished spans go into a bounded
//! queue; a background thread sends them in batches (OTLP over HTTP,
//! protobuf). A slow or absent collector fills the queue, and spans that do
//! not fit are dropped and counted (`otel_spans_dropped_total{reason}`),
//! never waited for. Shutdown sends what is queued within the grace period.
//! With no endpoint configured nothing is recorded: the request path pays a
//! flag check.
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `OTEL_EXPORTER_OTLP_ENDPOINT` | none: off | the collector, e.g. `http://127.0.0.1:4318` (`/v1/traces` is appended) |
//! | `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` | none | the traces URL itself, used as given |
//! | `OTEL_EXPORTER_OTLP_PROTOCOL` | `http/protobuf` | the only protocol built in: gRPC would add tonic and seven more crates to every service, and every OpenTelemetry collector takes OTLP/HTTP (port 4318) |
//! | `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES` | the service's name | the resource: `service.name`, `service.version`, `service.instance.id` and any `key=value,…` |
//! | `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG` | `parentbased_traceidratio`, `1.0` | which traces are recorded |
//!
//! The rest (timeouts, queue and batch sizes, turning it off) are listed
//! with [`TraceSettings`].
//!
//! # Running a collector locally
//!
//! Any OTLP/HTTP receiver works. With Docker, Jaeger's all-in-one image
//! takes OTLP on port 4318 and shows the traces on 16686:
//!
//! ```text
//! docker run --rm -p 4318:4318 -p 16686:16686 jaegertracing/all-in-one
//! OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 cargo run --release -p demo
//! ```
//!
//! (the demo passes its environment on to the four services), then open
//! `http://127.0.0.1:16686`. The OpenTelemetry Collector (`otelcol`) with
//! an `otlp` receiver and a `debug` exporter prints every span instead. In
//! tests, `chassis::testing::OtlpReceiver` is a collector on loopback that
//! decodes what a service exports (feature `testing`).
//!
//! # Adding a span to a handler
//!
//! Take the request's [`TraceContext`] (or [`RequestContext`]) as an
//! extractor, open a [`Span`] inside it, and pass the span's
//! [`trace`](Span::trace) to what runs inside it:
//! [`CallContext::with_trace`] for calls to other services,
//! [`Span::storage`] for a transaction, [`Span::internal`] for a step of
//! your own. Attributes follow the OpenTelemetry semantic conventions; keep
//! names low in cardinality (a route template, never a raw path).
//!
//! # Metrics exemplars
//!
//! A histogram bucket linked to a trace id (OpenMetrics exemplars) is not
//! offered: the Prometheus exporter the chassis uses
//! (`metrics-exporter-prometheus` 0.18) writes the Prometheus text format,
//! which has no exemplars, and the `metrics` facade has no way to pass a
//! trace with a sample. The access line and the audit event carry the
//! trace id instead, which finds a slow request's trace from its log.
//!
//! # How the chassis does it
//!
//! The chassis already owns each request's W3C ids ([`TraceContext`]): the
//! span id it logs is the server span's id, and each call's attempt gets a
//! child context. A [`Span`] keeps nothing unless its trace is sampled and
//! a pipeline runs; when it ends it becomes the OpenTelemetry SDK's
//! `SpanData`, which the SDK's OTLP exporter encodes and sends. The SDK's
//! tracer is not on the request path (it would pick its own span ids and
//! cost a tracer lookup per span), but [`Tracing::provider`] gives one
//! whose spans go through the same queue, for code that uses the
//! OpenTelemetry API.
//!
//! # Example
//!
//! A span around a step of a handler, and the context a call inside it
//! would take:
//!
//! ```
//! use chassis::{context::RequestContext, otel::Span};
//!
//! async fn place(ctx: RequestContext) -> &'static str {
//!     let mut span = Span::internal(ctx.trace(), "price order");
//!     span.set_attribute("order.lines", 3_i64);
//!     // ... calls made here pass `span.trace()` ...
//!     assert_eq!(span.trace().trace_id(), ctx.trace().trace_id());
//!     span.end();
//!     "placed"
//! }
//! # let ctx = RequestContext::from_headers(&http::HeaderMap::new());
//! # assert_eq!(futures_executor_free(place(ctx)), "placed");
//! # fn futures_executor_free<F: std::future::Future>(f: F) -> F::Output {
//! #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
//! # }
//! ```
//!
//! [`TraceContext`]: crate::context::TraceContext
//! [`RequestContext`]: crate::context::RequestContext
//! [`CallContext::with_trace`]: crate::client::CallContext::with_trace
//! [`TraceContext::traceparent`]: crate::context::TraceContext::traceparent
//! [`TraceContext::from_traceparent`]: crate::context::TraceContext::from_traceparent

mod config;
mod export;
mod span;

use std::sync::OnceLock;

pub use config::{Sampler, TraceSettings};
pub use export::{ResourceInfo, Tracing};
pub(crate) use export::{enabled, record};
pub use span::Span;

/// Starts what `settings` ask for: sets how this process samples the traces
/// it starts and continues, and, when an endpoint is configured, starts the
/// export pipeline (`None` otherwise: nothing is recorded). The service
/// builder calls it when it starts serving.
pub fn install(settings: &TraceSettings, resource: ResourceInfo) -> Option<Tracing> {
    let sampler = settings.sampler();
    if settings.exports() {
        crate::context::set_sampling(sampler.root_ratio(), sampler.follows_parent());
    } else {
        crate::context::set_sampling(0.0, true);
    }
    Tracing::start(settings, resource)
}

/// This process's `service.instance.id`: a UUIDv7 made once.
pub fn instance_id() -> String {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| crate::id::uuid_v7().to_string()).clone()
}
