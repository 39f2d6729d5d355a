//! Logging, the request span and the access log.
//!
//! # The standard
//!
//! A service writes its logs to stdout, **one JSON object per line**, so any
//! log pipeline can read them without a parser per service. Every line has
//! `time` (RFC 3339, UTC, microseconds), `level`, `target`, `service`,
//! `message` and the event's own fields; every line written while a request is
//! handled also has its `correlation_id` and `trace_id`. Under [`init`]'s
//! JSON log they come from the request whose future the thread is polling,
//! with no span to open and close per request; with a subscriber built by
//! hand (to add OpenTelemetry, say), each request runs inside a span named
//! `request` (target [`REQUEST_TARGET`]) that carries them. Background work
//! done for a request gets its ids onto its lines the same way, inside a
//! span of target [`REQUEST_TARGET`] with `correlation_id` and `trace_id`
//! fields. Values are escaped, so an id or a
//! user-supplied string with a newline cannot forge a second line (CWE-117).
//! `CHASSIS_LOG` filters (`info` by default, `EnvFilter` syntax), and
//! `CHASSIS_LOG_FORMAT=pretty` gives readable multi-line output for local
//! work.
//!
//! Every request also produces exactly one **access-log** event (target
//! `chassis::access`, message `request`) with `method`, `route` (the
//! template, never the raw path, which may carry identifiers or tokens),
//! `status` and `latency_us` (microseconds). Probes and scrapes of the standard endpoints are
//! logged at `debug`, the API at `info`.
//!
//! Nothing sensitive is logged: the chassis never logs request headers (so no
//! `Authorization` or `Cookie`), query strings or bodies, and configuration
//! secrets are [`Secret`](crate::config::Secret)s that print as `[redacted]`.
//!
//! Lines are formatted on the request's thread and appended to a buffer
//! that a background thread writes to stdout in bursts (a few milliseconds
//! after the first line of a burst, one `write` for all of it), so a slow
//! terminal or pipe never blocks a request and a busy service makes a few
//! hundred writes a second, not one per line. If stdout falls behind by
//! more than 16 MiB, lines are dropped rather than requests stalled, and a
//! `WARN` line says how many once it catches up.
//!
//! # How the chassis does it
//!
//! [`init`] installs the global subscriber (the service builder calls it).
//! [`JsonLayer`] is the formatter, usable with any `tracing-subscriber`
//! registry and writer. [`ObserveLayer`] opens the request span, records the
//! RED metrics of [`crate::metrics`] and writes the access log; it measures a
//! request until its response body has been sent (or dropped), except for
//! bodies of known length, which are measured when the response is ready.
//!
//! # Example
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use chassis::telemetry::JsonLayer;
//! use tracing_subscriber::prelude::*;
//!
//! #[derive(Clone, Default)]
//! struct Buf(Arc<Mutex<Vec<u8>>>);
//! impl std::io::Write for Buf {
//!     fn write(&mut self, b: &[u8]) -> std::io::Result<usize> { self.0.lock().unwrap().write(b) }
//!     fn flush(&mut self) -> std::io::Result<()> { Ok(()) }
//! }
//!
//! let buf = Buf::default();
//! let out = buf.clone();
//! let subscriber = tracing_subscriber::registry().with(JsonLayer::new("hello", move || out.clone()));
//! tracing::subscriber::with_default(subscriber, || {
//!     tracing::info!(user = "ann\n{\"forged\":1}", "signed in");
//! });
//! let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
//! assert_eq!(text.lines().count(), 1);
//! let line: serde_json::Value = serde_json::from_str(&text).unwrap();
//! assert_eq!(line["service"], "hello");
//! assert_eq!(line["message"], "signed in");
//! assert_eq!(line["user"], "ann\n{\"forged\":1}");
//! ```
//!
//! # Ordering
//!
//! [`ObserveLayer`] goes inside the correlation layer (it reads the id) and
//! outside shedding, timeouts and the panic catcher, so their answers are
//! measured and logged like any other. It must be applied with
//! `Router::layer` so that it sees the matched route.

use std::{
    cell::RefCell,
    fmt::{self, Write as _},
    future::Future,
    io::Write as _,
    pin::Pin,
    task::{Context, Poll, ready},
    time::SystemTime,
};

use axum::{body::Body, extract::MatchedPath, response::Response};
use bytes::Bytes;
use http::Request;
use http_body::{Body as _, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::{Layer, Service};
use tracing::{
    Event, Span, Subscriber,
    field::{Field, Visit},
    span::{Attributes, Id},
};
use tracing_subscriber::{
    EnvFilter, Registry,
    filter::Targets,
    fmt::MakeWriter,
    layer::{Context as LayerContext, SubscriberExt},
    registry::LookupSpan,
    util::SubscriberInitExt,
};

use crate::{
    config::{Config, LogFormat},
    correlation::{Correlation, HexId},
    metrics::{HttpMetrics, UNMATCHED, method_index},
};

/// Target of the request spans.
pub const REQUEST_TARGET: &str = "chassis::request";
/// Target of the access-log events.
pub const ACCESS_TARGET: &str = "chassis::access";
/// Keeps the log writer alive; dropping it flushes buffered lines.
#[must_use = "dropping the guard stops the log writer"]
pub struct Telemetry {
    _guard: Option<writer::WriterGuard>,
}

impl fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

/// Installs the global subscriber: `CHASSIS_LOG` filter, JSON or pretty
/// format, stdout through a background writer. If a global subscriber is
/// already installed (a test harness, or a second call) it is kept.
pub fn init(service: &str, config: &Config) -> Telemetry {
    init_with_writer(service, config, std::io::stdout())
}

/// [`init`], writing the log to `out` instead of stdout: for a benchmark
/// that must pay for everything a service's log costs but the terminal, or
/// a process that sends its log elsewhere.
///
/// ```
/// let config = chassis::Config::default();
/// let _telemetry = chassis::telemetry::init_with_writer("hello", &config, std::io::sink());
/// tracing::info!("written to the sink");
/// ```
pub fn init_with_writer<W>(service: &str, config: &Config, out: W) -> Telemetry
where
    W: std::io::Write + Send + 'static,
{
    let quoted_service = quoted(service);
    let (writer, guard) = LogWriter::spawn(out, move |dropped| {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(b"{\"time\":\"");
        write_rfc3339(&mut buf, SystemTime::now());
        buf.extend_from_slice(
            b"\",\"level\":\"WARN\",\"target\":\"chassis::telemetry\",\"service\":",
        );
        buf.extend_from_slice(&quoted_service);
        buf.extend_from_slice(
            b",\"message\":\"log lines dropped: stdout fell behind\",\"dropped\":",
        );
        write_u64(&mut buf, dropped);
        JsonLines::end_line(&mut buf);
        buf
    });
    // A plain `target=level` list (the usual case) is served by `Targets`,
    // which keeps no per-span state; span and field directives need `EnvFilter`.
    let filter: Box<dyn tracing_subscriber::Layer<Registry> + Send + Sync> =
        match config.log.parse::<Targets>() {
            Ok(targets) => Box::new(targets),
            Err(_) => Box::new(EnvFilter::builder().parse_lossy(&config.log)),
        };
    let lines = JsonLines {
        service: quoted(service),
        writer: writer.clone(),
    };
    let installed = match config.log_format {
        LogFormat::Json => Registry::default()
            .with(filter)
            .with(WithoutRequestSpans)
            .with(JsonLayer::new(service, writer))
            .try_init()
            .inspect(|()| {
                let _ = JSON_LINES.set(lines);
            }),
        LogFormat::Pretty => Registry::default()
            .with(filter)
            .with(
                tracing_subscriber::fmt::layer()
                    .pretty()
                    .with_writer(writer),
            )
            .try_init(),
    };
    if installed.is_ok() {
        log_panics();
    }
    Telemetry {
        _guard: installed.is_ok().then_some(guard),
    }
}

/// The installed JSON log's writer, for a producer that formats whole lines
/// of the same shape itself (the audit log sink, which writes a batch of
/// events as one message instead of one event each through `tracing`).
/// Set only when [`init`] installed the JSON format.
static JSON_LINES: std::sync::OnceLock<JsonLines> = std::sync::OnceLock::new();

/// See [`JSON_LINES`].
#[derive(Clone)]
pub(crate) struct JsonLines {
    /// The service name as a JSON string, quotes included.
    service: Box<[u8]>,
    writer: LogWriter,
}

/// The JSON log installed by [`init`], if any.
pub(crate) fn json_lines() -> Option<&'static JsonLines> {
    JSON_LINES.get()
}

impl JsonLines {
    /// Starts a line as [`JsonLayer`] does (`target` and `message` are
    /// literals of this crate and the ids validated, so they are not
    /// escaped; the service name was escaped once): `{"time":..,"level":"INFO",
    /// "target":..,"service":..`, the request's `correlation_id` and
    /// `trace_id` when given (as the request span adds them), then
    /// `"message":..`; the caller adds `,"field":value` pairs and ends it
    /// with [`end_line`](Self::end_line).
    pub(crate) fn begin_line(
        &self,
        buf: &mut Vec<u8>,
        time: SystemTime,
        target: &str,
        request: Option<(&[u8], &[u8])>,
        message: &str,
    ) {
        buf.extend_from_slice(b"{\"time\":\"");
        write_rfc3339(buf, time);
        write_field(buf, "\",\"level\":\"INFO\",\"target\":\"", target, false);
        buf.extend_from_slice(b",\"service\":");
        buf.extend_from_slice(&self.service);
        if let Some((correlation_id, trace_id)) = request {
            // Validated ids: nothing to escape.
            buf.extend_from_slice(b",\"correlation_id\":\"");
            buf.extend_from_slice(correlation_id);
            buf.extend_from_slice(b"\",\"trace_id\":\"");
            buf.extend_from_slice(trace_id);
            buf.push(b'"');
        }
        write_field(buf, ",\"message\":\"", message, false);
    }

    /// Lines for `service` to `writer`, without installing anything.
    #[cfg(test)]
    pub(crate) fn new(service: &str, writer: LogWriter) -> Self {
        Self {
            service: quoted(service),
            writer,
        }
    }

    /// Ends a line.
    pub(crate) fn end_line(buf: &mut Vec<u8>) {
        buf.extend_from_slice(b"}\n");
    }

    /// Hands whole lines to the log writer.
    pub(crate) fn write(&self, lines: &[u8]) {
        self.writer.write(lines);
    }
}

/// Logs panics as `error` events (inside the request span, so with the
/// correlation id) instead of raw text on stderr.
fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(non-text payload)");
        let location = info.location().map(ToString::to_string).unwrap_or_default();
        tracing::error!(target: "chassis::panic", panic = message, location, "panicked");
    }));
}

/// The correlation fields of a request: kept in the request span's
/// extensions, and in [`CURRENT`] while the request is polled (inline, so
/// neither allocates strings).
#[derive(Clone, Copy)]
struct RequestFields {
    correlation_id: Inline<{ crate::correlation::MAX_LEN }>,
    trace_id: Inline<32>,
}

/// A short string kept inline; longer values are cut (ids are bounded).
#[derive(Clone, Copy)]
struct Inline<const N: usize> {
    len: u8,
    buf: [u8; N],
}

impl<const N: usize> Inline<N> {
    const EMPTY: Self = Self {
        len: 0,
        buf: [0; N],
    };

    fn set(&mut self, s: &str) {
        let mut n = s.len().min(N);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.buf[..n].copy_from_slice(&s.as_bytes()[..n]);
        self.len = n as u8;
    }

    /// Sets ASCII text (a validated id), cut to `N` bytes.
    fn set_ascii(&mut self, s: &[u8]) {
        debug_assert!(s.is_ascii());
        let n = s.len().min(N);
        self.buf[..n].copy_from_slice(&s[..n]);
        self.len = n as u8;
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
}

impl Visit for RequestFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "correlation_id" => self.correlation_id.set(value),
            "trace_id" => self.trace_id.set(value),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if matches!(field.name(), "correlation_id" | "trace_id") {
            self.record_str(field, &format!("{value:?}"));
        }
    }
}

/// A `tracing-subscriber` layer that writes one JSON object per event; see
/// the [module docs](self).
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
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
}

/// Runs `f` with this thread's empty line buffer; a re-entrant call (an
/// event logged while a line is formatted) gets a buffer of its own.
pub(crate) fn with_line(f: impl FnOnce(&mut Vec<u8>)) {
    LINE.with(|line| {
        let mut fresh = Vec::new();
        let mut borrowed = line.try_borrow_mut();
        let buf = match borrowed.as_deref_mut() {
            Ok(buf) => buf,
            Err(_) => &mut fresh,
        };
        buf.clear();
        f(buf);
    });
}

thread_local! {
    /// The ids of the request whose future this thread is polling.
    static CURRENT: std::cell::Cell<Option<RequestFields>> = const { std::cell::Cell::new(None) };
}

/// Puts a request's ids in [`CURRENT`] while its future is polled, and puts
/// back what was there (a request polled inside another) when dropped.
struct CurrentIds(Option<RequestFields>);

impl CurrentIds {
    fn enter(ids: RequestFields) -> Self {
        Self(CURRENT.with(|current| current.replace(Some(ids))))
    }
}

impl Drop for CurrentIds {
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
struct WithoutRequestSpans;

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
const RESERVED: [&str; 6] = [
    "time",
    "level",
    "target",
    "service",
    "correlation_id",
    "trace_id",
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
        let mut fields = RequestFields {
            correlation_id: Inline::EMPTY,
            trace_id: Inline::EMPTY,
        };
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
            "correlation_id" | "trace_id" => self.has_request,
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

/// `fmt::Write` that escapes for the inside of a JSON string.
struct Escaper<'a>(&'a mut Vec<u8>);

impl fmt::Write for Escaper<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        escape_into(self.0, s);
        Ok(())
    }
}

/// `n` in decimal, without the formatting machinery.
pub(crate) fn write_u64(buf: &mut Vec<u8>, n: u64) {
    buf.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// `s` as a JSON string, quotes included.
fn quoted(s: &str) -> Box<[u8]> {
    let mut buf = Vec::with_capacity(s.len() + 2);
    write_json_str(&mut buf, s);
    buf.into_boxed_slice()
}

/// Appends a string member: `key` is the literal before the value, up to
/// and including its opening quote (`,"name":"`), so a member costs one
/// copy for its name and punctuation, one for the value and the closing
/// quote. The value is escaped when `escape`; with `escape` false it is
/// copied as it is, which is only for text that cannot need escaping by
/// construction (a validated grammar such as a correlation id, an account,
/// a permission, an HTTP method, or a literal of this crate).
#[inline]
pub(crate) fn write_field(buf: &mut Vec<u8>, key: &'static str, value: &str, escape: bool) {
    buf.extend_from_slice(key.as_bytes());
    if escape {
        escape_into(buf, value);
    } else {
        debug_assert!(!needs_escape(value.as_bytes()), "{value:?} needs escaping");
        buf.extend_from_slice(value.as_bytes());
    }
    buf.push(b'"');
}

pub(crate) fn write_json_str(buf: &mut Vec<u8>, s: &str) {
    buf.push(b'"');
    escape_into(buf, s);
    buf.push(b'"');
}

/// Whether any of the 8 bytes of `x` needs escaping in a JSON string: a
/// control character (below 0x20, or 0x7f), `"` or `\\`. Bytes of 0x80 and
/// above (UTF-8) never do. Exact: the classic "has a byte less than n" and
/// "has a zero byte" tests, which report whether any byte matches, not which.
#[inline]
fn word_needs_escape(x: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let has_zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH != 0;
    let below_space = x.wrapping_sub(ONES * 0x20) & !x & HIGH != 0;
    below_space
        || has_zero(x ^ (ONES * u64::from(b'"')))
        || has_zero(x ^ (ONES * u64::from(b'\\')))
        || has_zero(x ^ (ONES * 0x7f))
}

fn escape_into(buf: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    // Most text needs no escape: check it whole, then copy it once.
    if !needs_escape(bytes) {
        buf.extend_from_slice(bytes);
        return;
    }
    escape_each(buf, bytes);
}

/// The 8 bytes of `b` from `i` (which the caller keeps in bounds).
#[inline]
fn word_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(
        b.get(i..i + 8)
            .and_then(|w| w.try_into().ok())
            .unwrap_or([0; 8]),
    )
}

/// Whether any byte of `bytes` needs escaping, a word at a time: a short
/// string is padded with spaces, and the tail of a longer one is checked as
/// its last 8 bytes (overlapping the previous word), never byte by byte.
#[inline]
fn needs_escape(bytes: &[u8]) -> bool {
    let n = bytes.len();
    if n < 8 {
        let mut w = [b' '; 8];
        w[..n].copy_from_slice(bytes);
        return word_needs_escape(u64::from_le_bytes(w));
    }
    let mut i = 0;
    while i + 8 <= n {
        if word_needs_escape(word_at(bytes, i)) {
            return true;
        }
        i += 8;
    }
    i < n && word_needs_escape(word_at(bytes, n - 8))
}

/// How many clean route templates each thread remembers, see
/// [`route_is_clean`].
const CLEAN_ROUTE_SLOTS: usize = 8;

thread_local! {
    static CLEAN_ROUTES: std::cell::RefCell<[Option<MatchedPath>; CLEAN_ROUTE_SLOTS]> =
        const { std::cell::RefCell::new([const { None }; CLEAN_ROUTE_SLOTS]) };
}

/// Whether `route` needs no escaping in a JSON string. A template found
/// clean is remembered by this thread (the entry holds it, so its address
/// cannot be reused by other text), and the same template, by address and
/// length, is not scanned again: the access line and the audit line of
/// every request carry the route.
pub(crate) fn route_is_clean(route: &MatchedPath) -> bool {
    let text = route.as_str();
    let slot = (text.as_ptr() as usize >> 4) % CLEAN_ROUTE_SLOTS;
    CLEAN_ROUTES.with_borrow_mut(|routes| {
        if routes[slot]
            .as_ref()
            .is_some_and(|r| std::ptr::eq(r.as_str(), text))
        {
            return true;
        }
        if needs_escape(text.as_bytes()) {
            return false;
        }
        routes[slot] = Some(route.clone());
        true
    })
}

/// Escapes `bytes`, which needs it somewhere.
fn escape_each(buf: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    buf.reserve(bytes.len() + 8);
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        // Skip clean runs eight bytes at a time: most text needs no escape.
        if let Some(chunk) = bytes.get(i..i + 8) {
            let word = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
            if !word_needs_escape(word) {
                i += 8;
                continue;
            }
        }
        let b = bytes[i];
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f | 0x7f => b"",
            _ => {
                i += 1;
                continue;
            }
        };
        buf.extend_from_slice(&bytes[start..i]);
        if esc.is_empty() {
            buf.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]);
        } else {
            buf.extend_from_slice(esc);
        }
        i += 1;
        start = i;
    }
    buf.extend_from_slice(&bytes[start..]);
}

thread_local! {
    /// The last second formatted, `YYYY-MM-DDTHH:MM:SS`, and its value.
    static SECOND: std::cell::Cell<(u64, [u8; 19])> = const { std::cell::Cell::new((u64::MAX, [0; 19])) };
}

/// Writes `t` as `YYYY-MM-DDTHH:MM:SS.uuuuuuZ`. The date and time part is
/// formatted once per second per thread; the microseconds by hand.
pub(crate) fn write_rfc3339(buf: &mut Vec<u8>, t: SystemTime) {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (cached, mut text) = SECOND.get();
    if cached != secs {
        text = civil(secs);
        SECOND.set((secs, text));
    }
    buf.extend_from_slice(&text);
    let mut micros = d.subsec_micros();
    let mut digits = [b'0'; 6];
    for slot in digits.iter_mut().rev() {
        *slot = b'0' + (micros % 10) as u8;
        micros /= 10;
    }
    buf.push(b'.');
    buf.extend_from_slice(&digits);
    buf.push(b'Z');
}

/// `YYYY-MM-DDTHH:MM:SS` of a Unix time.
fn civil(secs: u64) -> [u8; 19] {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = [0u8; 19];
    let mut w = &mut out[..];
    let _ = write!(
        w,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    let _ = &mut w;
    out
}

/// Layer that opens the request span, records RED metrics and writes the
/// access log; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct ObserveLayer {
    metrics: HttpMetrics,
}

impl ObserveLayer {
    /// Records into `metrics`.
    pub fn new(metrics: HttpMetrics) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Observe {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// Service built by [`ObserveLayer`].
#[derive(Debug, Clone)]
pub struct Observe<S> {
    inner: S,
    metrics: HttpMetrics,
}

impl<S> Observe<S> {
    define_inner_service_accessors!();
}

/// Whether a route is one of the standard endpoints, whose access logs are
/// `debug`.
fn is_standard(route: &str) -> bool {
    matches!(
        route,
        "/health/live" | "/health/ready" | "/metrics" | "/info"
    )
}

impl<S, B> Service<Request<B>> for Observe<S>
where
    S: Service<Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        observe(&mut self.inner, &self.metrics, req)
    }
}

/// What [`Observe`] does: calls `inner` with `req`, and returns its future
/// wrapped to enter the request's ids while polled and to record the request
/// at its end.
pub(crate) fn observe<S, B>(
    inner: &mut S,
    metrics: &HttpMetrics,
    req: Request<B>,
) -> ResponseFuture<S::Future>
where
    S: Service<Request<B>, Response = Response>,
{
    let guard = begin(metrics, &req);
    // `call` of the layers inside only builds futures; the span is entered
    // while they are polled.
    ResponseFuture::new(inner.call(req), guard)
}

/// Starts observing `req`, before the inner service is called: what
/// [`ResponseFuture`] records when the request ends.
pub(crate) fn begin<B>(metrics: &HttpMetrics, req: &Request<B>) -> Guard {
    let ids = req.extensions().get::<Correlation>();
    let start = ids.map_or_else(Instant::now, Correlation::received);
    let method = method_index(req.method());
    let route = req.extensions().get::<MatchedPath>().cloned();
    let route_str = route.as_ref().map_or(UNMATCHED, MatchedPath::as_str);
    let standard = is_standard(route_str);
    // Hex-encoded once for the span, the thread-local ids and the
    // access line.
    let trace_hex = ids.map(|c| c.trace().trace_id());
    // The field values are only computed when the span is enabled (it is
    // not under `init`'s JSON log).
    let span = {
        let m = req.method().as_str();
        if standard {
            tracing::debug_span!(target: REQUEST_TARGET, "request", method = m, route = route_str, correlation_id = ids.map(|c| c.id().as_str()), trace_id = trace_hex.as_ref().map(HexId::as_str))
        } else {
            tracing::info_span!(target: REQUEST_TARGET, "request", method = m, route = route_str, correlation_id = ids.map(|c| c.id().as_str()), trace_id = trace_hex.as_ref().map(HexId::as_str))
        }
    };
    let fields = ids.zip(trace_hex.as_ref()).map(|(c, trace)| {
        let mut f = RequestFields {
            correlation_id: Inline::EMPTY,
            trace_id: Inline::EMPTY,
        };
        // Both are ASCII by construction: copied without a UTF-8 check.
        f.correlation_id.set_ascii(c.id().header_value().as_bytes());
        f.trace_id.set_ascii(trace.as_bytes());
        f
    });
    // The access line of an API call is written directly when the
    // chassis' JSON log is installed; it needs the request's ids, which
    // `fields` holds.
    let direct = !standard && fields.is_some() && json_lines().is_some();
    metrics.active(method).increment(1.0);
    Guard {
        start,
        method,
        route,
        standard,
        direct,
        fields,
        span,
        status: None,
        metrics: metrics.clone(),
    }
}

/// Records the request when dropped: at the end of the body, when the
/// response is ready (bodies of known length), or when the client went away
/// first (status 499, as nginx logs it).
pub(crate) struct Guard {
    start: Instant,
    method: usize,
    route: Option<MatchedPath>,
    standard: bool,
    /// Whether the access line is written directly, see [`access_line`],
    /// with the ids in `fields`.
    direct: bool,
    /// The ids put in [`CURRENT`] while the request is polled.
    fields: Option<RequestFields>,
    /// The request span; disabled under [`init`]'s JSON log.
    span: Span,
    status: Option<u16>,
    metrics: HttpMetrics,
}

/// Status recorded for a request whose client went away before the response.
const CLIENT_CLOSED: u16 = 499;

impl Drop for Guard {
    fn drop(&mut self) {
        let elapsed = self.start.elapsed();
        let status = self.status.unwrap_or(CLIENT_CLOSED);
        self.metrics
            .record_route(self.route.as_ref(), self.method, status, elapsed);
        let route = self.route.as_ref().map_or(UNMATCHED, MatchedPath::as_str);
        self.metrics.active(self.method).decrement(1.0);
        let latency_us = elapsed.as_micros() as u64;
        let method = crate::metrics::method_label_of(self.method);
        if let (true, Some(ids), Some(lines)) = (self.direct, &self.fields, json_lines()) {
            if tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO) {
                // `unmatched` is a literal of this crate.
                let clean = self.route.as_ref().is_none_or(route_is_clean);
                access_line(lines, ids, method, (route, clean), status, latency_us);
            }
            return;
        }
        if self.span.is_disabled() {
            // No span to name as parent: the ids go the way they go for
            // the handler's events.
            let _ids = self.fields.map(CurrentIds::enter);
            if self.standard {
                tracing::debug!(target: ACCESS_TARGET, method, route, status, latency_us, "request");
            } else {
                tracing::info!(target: ACCESS_TARGET, method, route, status, latency_us, "request");
            }
            return;
        }
        // An explicit parent puts the event in the request span without
        // entering it.
        if self.standard {
            tracing::debug!(target: ACCESS_TARGET, parent: &self.span, method, route, status, latency_us, "request");
        } else {
            tracing::info!(target: ACCESS_TARGET, parent: &self.span, method, route, status, latency_us, "request");
        }
    }
}

/// The access line of an API call, as the `tracing` event in
/// [`Guard`]'s drop would render it through [`JsonLayer`], written to the
/// log directly: one line per request is the chassis' most frequent log
/// line, and this skips the dispatch, the span lookup and the field visitor.
fn access_line(
    lines: &JsonLines,
    ids: &RequestFields,
    method: &str,
    (route, route_clean): (&str, bool),
    status: u16,
    latency_us: u64,
) {
    with_line(|buf| {
        lines.begin_line(
            buf,
            SystemTime::now(),
            ACCESS_TARGET,
            Some((ids.correlation_id.as_bytes(), ids.trace_id.as_bytes())),
            "request",
        );
        // An HTTP method is a token: no quote, backslash or control byte.
        write_field(buf, ",\"method\":\"", method, false);
        write_field(buf, ",\"route\":\"", route, !route_clean);
        buf.extend_from_slice(b",\"status\":");
        write_u64(buf, u64::from(status));
        buf.extend_from_slice(b",\"latency_us\":");
        write_u64(buf, latency_us);
        JsonLines::end_line(buf);
        lines.write(buf);
    });
}

pin_project! {
    /// Response future of [`Observe`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        guard: Option<Guard>,
    }
}

impl<F> ResponseFuture<F> {
    /// Observes `inner`, the future of the request `guard` was begun for.
    #[inline]
    pub(crate) fn new(inner: F, guard: Guard) -> Self {
        Self {
            inner,
            guard: Some(guard),
        }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = {
            let _ids = this
                .guard
                .as_ref()
                .and_then(|g| g.fields)
                .map(CurrentIds::enter);
            let _enter = this.guard.as_ref().map(|g| g.span.enter());
            ready!(this.inner.poll(cx))
        };
        // The guard is recorded where it lies (`*this.guard = None` drops it
        // in place); it is moved out only to follow a streamed body.
        let Some(guard) = this.guard.as_mut() else {
            return Poll::Ready(result);
        };
        match result {
            Ok(res) => {
                guard.status = Some(res.status().as_u16());
                let known_length = res.body().size_hint().exact().is_some();
                if known_length || res.body().is_end_stream() {
                    *this.guard = None;
                    Poll::Ready(Ok(res))
                } else {
                    let guard = this.guard.take();
                    Poll::Ready(Ok(
                        res.map(|body| Body::new(ObservedBody { inner: body, guard }))
                    ))
                }
            }
            Err(e) => {
                guard.status = Some(500);
                *this.guard = None;
                Poll::Ready(Err(e))
            }
        }
    }
}

pin_project! {
    /// A streaming response body that records the request when it ends.
    struct ObservedBody {
        #[pin]
        inner: Body,
        guard: Option<Guard>,
    }
}

impl http_body::Body for ObservedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if !matches!(frame, Some(Ok(_))) {
            this.guard.take();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

mod writer;

pub(crate) use writer::LogWriter;

#[cfg(test)]
mod tests;
