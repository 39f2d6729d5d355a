//! The log format: [`JsonLayer`], one JSON object per event, with the
//! request's ids.

use std::{
    fmt::{self, Write as _},
    io::Write as _,
    time::SystemTime,
};

use tracing::{
    Event, Subscriber,
    field::{Field, Visit},
    span::{Attributes, Id},
};
use tracing_subscriber::{fmt::MakeWriter, layer::Context as LayerContext, registry::LookupSpan};

use super::REQUEST_TARGET;
use crate::log_line::{Escaper, escape_into, with_line, write_json_str, write_rfc3339, write_u64};

/// The correlation fields of a request: kept in the request span's
/// extensions, and in [`CURRENT`] while the request is polled (inline, so
/// neither allocates strings).
#[derive(Clone, Copy)]
pub(crate) struct RequestFields {
    pub(super) correlation_id: Inline<{ crate::context::MAX_LEN }>,
    pub(super) trace_id: Inline<32>,
    /// The id of the span the line belongs to: the request's server span.
    pub(super) span_id: Inline<16>,
}

impl RequestFields {
    /// No ids yet.
    pub(super) const EMPTY: Self = Self {
        correlation_id: Inline::EMPTY,
        trace_id: Inline::EMPTY,
        span_id: Inline::EMPTY,
    };
}

/// A short string kept inline; longer values are cut (ids are bounded).
#[derive(Clone, Copy)]
pub(crate) struct Inline<const N: usize> {
    len: u8,
    buf: [u8; N],
}

impl<const N: usize> Inline<N> {
    pub(super) const EMPTY: Self = Self {
        len: 0,
        buf: [0; N],
    };

    pub(super) fn set(&mut self, s: &str) {
        let mut n = s.len().min(N);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.buf[..n].copy_from_slice(&s.as_bytes()[..n]);
        self.len = n as u8;
    }

    /// Sets ASCII text (a validated id), cut to `N` bytes.
    #[inline]
    pub(super) fn set_ascii(&mut self, s: &[u8]) {
        debug_assert!(s.is_ascii());
        let n = s.len().min(N);
        self.buf[..n].copy_from_slice(&s[..n]);
        self.len = n as u8;
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }

    #[inline]
    pub(super) fn as_bytes(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
}

impl Visit for RequestFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "correlation_id" => self.correlation_id.set(value),
            "trace_id" => self.trace_id.set(value),
            "span_id" => self.span_id.set(value),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if matches!(field.name(), "correlation_id" | "trace_id" | "span_id") {
            self.record_str(field, &format!("{value:?}"));
        }
    }
}

/// A `tracing-subscriber` layer that writes one JSON object per event; see
/// the [module docs](crate::telemetry).
pub struct JsonLayer<W> {
    service: Box<str>,
    make_writer: W,
}

impl<W> fmt::Debug for JsonLayer<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JsonLayer")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl<W> JsonLayer<W>
where
    W: for<'w> MakeWriter<'w> + 'static,
{
    /// Writes the lines of `service` to `make_writer`.
    pub fn new(service: &str, make_writer: W) -> Self {
        Self {
            service: service.into(),
            make_writer,
        }
    }
}

thread_local! {
    /// The ids of the request whose future this thread is polling.
    static CURRENT: std::cell::Cell<Option<RequestFields>> = const { std::cell::Cell::new(None) };
}

/// Puts a request's ids in [`CURRENT`] while its future is polled, and puts
/// back what was there (a request polled inside another) when dropped.
pub(crate) struct CurrentIds(Option<RequestFields>);

impl CurrentIds {
    #[inline]
    pub(super) fn enter(ids: RequestFields) -> Self {
        Self(CURRENT.with(|current| current.replace(Some(ids))))
    }
}

impl Drop for CurrentIds {
    #[inline]
    fn drop(&mut self) {
        CURRENT.with(|current| current.set(self.0.take()));
    }
}

/// Turns off the span [`Observe`] opens per request (target
/// [`REQUEST_TARGET`], name `request`) in the subscriber [`init`] installs
/// for JSON: the JSON log takes a request's ids from [`CURRENT`], so there
/// the span would cost a registry slot, an extension and a close per
/// request for nothing. Other spans of the request target (background work
/// carrying a request's ids) stay, and a subscriber built by hand (with
/// OpenTelemetry, say) keeps the request span too.
pub(crate) struct WithoutRequestSpans;

impl WithoutRequestSpans {
    fn is_request_span(meta: &tracing::Metadata<'_>) -> bool {
        meta.is_span() && meta.target() == REQUEST_TARGET && meta.name() == "request"
    }
}

impl<S: Subscriber> tracing_subscriber::Layer<S> for WithoutRequestSpans {
    fn register_callsite(
        &self,
        meta: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        if Self::is_request_span(meta) {
            tracing::subscriber::Interest::never()
        } else {
            tracing::subscriber::Interest::always()
        }
    }

    fn enabled(&self, meta: &tracing::Metadata<'_>, _: LayerContext<'_, S>) -> bool {
        !Self::is_request_span(meta)
    }
}

/// Fields whose names the line itself uses; an event field with one of these
/// names is written with a `field.` prefix instead of overwriting it.
const RESERVED: [&str; 7] = [
    "time",
    "level",
    "target",
    "service",
    "correlation_id",
    "trace_id",
    "span_id",
];

impl<S, W> tracing_subscriber::Layer<S> for JsonLayer<W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + 'static,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: LayerContext<'_, S>) {
        if attrs.metadata().target() != REQUEST_TARGET {
            return;
        }
        let mut fields = RequestFields::EMPTY;
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: LayerContext<'_, S>) {
        with_line(|buf| {
            let meta = event.metadata();
            buf.extend_from_slice(b"{\"time\":\"");
            write_rfc3339(buf, SystemTime::now());
            buf.extend_from_slice(b"\",\"level\":\"");
            buf.extend_from_slice(meta.level().as_str().as_bytes());
            buf.extend_from_slice(b"\",\"target\":");
            write_json_str(buf, meta.target());
            buf.extend_from_slice(b",\"service\":");
            write_json_str(buf, &self.service);
            let write_ids = |buf: &mut Vec<u8>, f: &RequestFields| {
                buf.extend_from_slice(b",\"correlation_id\":");
                write_json_str(buf, f.correlation_id.as_str());
                buf.extend_from_slice(b",\"trace_id\":");
                write_json_str(buf, f.trace_id.as_str());
                if !f.span_id.as_bytes().is_empty() {
                    buf.extend_from_slice(b",\"span_id\":");
                    write_json_str(buf, f.span_id.as_str());
                }
            };
            // The request being polled on this thread, for an event that
            // names no parent of its own; else the request span around it.
            let mut has_request = event.is_contextual()
                && CURRENT.with(|current| {
                    let ids = current.get();
                    if let Some(f) = &ids {
                        write_ids(buf, f);
                    }
                    ids.is_some()
                });
            if !has_request && let Some(scope) = ctx.event_scope(event) {
                for span in scope {
                    let ext = span.extensions();
                    if let Some(f) = ext.get::<RequestFields>() {
                        write_ids(buf, f);
                        has_request = true;
                        break;
                    }
                }
            }
            event.record(&mut JsonFields { buf, has_request });
            buf.extend_from_slice(b"}\n");
            let _ = self.make_writer.make_writer_for(meta).write_all(buf);
        });
    }
}

/// Writes event fields as `,"name":value`.
struct JsonFields<'a> {
    buf: &'a mut Vec<u8>,
    /// Whether the line carries a request span's ids already.
    has_request: bool,
}

impl JsonFields<'_> {
    fn key(&mut self, field: &Field) {
        let name = field.name();
        self.buf.push(b',');
        let taken = match name {
            "correlation_id" | "trace_id" | "span_id" => self.has_request,
            _ => RESERVED.contains(&name),
        };
        if taken {
            self.buf.extend_from_slice(b"\"field.");
            escape_into(self.buf, name);
            self.buf.push(b'"');
        } else if name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        {
            // Field names are almost always identifiers: nothing to escape.
            self.buf.push(b'"');
            self.buf.extend_from_slice(name.as_bytes());
            self.buf.push(b'"');
        } else {
            write_json_str(self.buf, name);
        }
        self.buf.push(b':');
    }
}

impl Visit for JsonFields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.key(field);
        write_json_str(self.buf, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.key(field);
        self.buf
            .extend_from_slice(if value { b"true" } else { b"false" });
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.key(field);
        if value < 0 {
            self.buf.push(b'-');
        }
        write_u64(self.buf, value.unsigned_abs());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.key(field);
        write_u64(self.buf, value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.key(field);
        if value.is_finite() {
            let _ = write!(self.buf, "{value}");
        } else {
            let _ = write!(self.buf, "\"{value}\"");
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.key(field);
        self.buf.push(b'"');
        let mut w = Escaper(self.buf);
        let _ = write!(w, "{value}");
        let mut source = value.source();
        while let Some(s) = source {
            let _ = write!(w, ": {s}");
            source = s.source();
        }
        self.buf.push(b'"');
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.key(field);
        self.buf.push(b'"');
        let _ = write!(Escaper(self.buf), "{value:?}");
        self.buf.push(b'"');
    }
}
