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

use std::{fmt, time::SystemTime};

use tracing_subscriber::{
    EnvFilter, Registry, filter::Targets, layer::SubscriberExt, util::SubscriberInitExt,
};

use crate::config::{Config, LogFormat};

use crate::log_line::{JSON_LINES, JsonLines, LogWriter, quoted, write_rfc3339, write_u64};

mod json;
mod observe;

pub use json::JsonLayer;
use json::WithoutRequestSpans;
pub(crate) use observe::begin;
pub use observe::{Observe, ObserveLayer, ResponseFuture};

/// Target of the request spans.
pub const REQUEST_TARGET: &str = "chassis::request";
/// Target of the access-log events.
pub const ACCESS_TARGET: &str = "chassis::access";
/// Keeps the log writer alive; dropping it flushes buffered lines.
#[must_use = "dropping the guard stops the log writer"]
pub struct Telemetry {
    _guard: Option<crate::log_line::WriterGuard>,
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
    let lines = JsonLines::new(service, writer.clone());
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

#[cfg(test)]
mod tests;
