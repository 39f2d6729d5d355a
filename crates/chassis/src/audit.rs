//! Audit: one record per API call, whatever its outcome.
//!
//! # The standard
//!
//! Every API call produces **exactly one** audit event: allowed, denied,
//! unauthenticated, or rejected before authorization (an invalid account in
//! the path, load shedding, a body too large). The event answers who did
//! what to which resource, and what came of it:
//!
//! | field | example |
//! |---|---|
//! | `time` | `2026-11-21T22:36:19.123456Z` |
//! | `service` | `ticketing` |
//! | `correlation_id` | `0193…` |
//! | `trace_id`, `span_id` | `0193…`, `9f3c…` (the W3C trace id and the call's server span, which find its spans) |
//! | `subject`, `subject_kind` | `ann`, `user` (or `anonymous`) |
//! | `method`, `route` | `POST`, `/ticketing/v1/{account}/tickets` (the template) |
//! | `api_version` | `1`: the API version the call was made to (see [`ApiVersion`](crate::service::ApiVersion)); absent for a message, or where the stack was composed by hand without [`AuditLayer::api_version`] |
//! | `account` | `67000001` (the validated one) |
//! | `permission` | `ticketing:67000001:create:ticket` |
//! | `decision`, `reason` | `allow` / `deny` / `unauthenticated` / `rejected`, and the reason code |
//! | `status`, `latency_ms` | `201`, `3.2` |
//! | `mutation` | `true` for a successful POST, PUT, PATCH or DELETE |
//! | `message` | for a message, what was decided about it (below); absent for an API call |
//!
//! A **message** a service consumes (see `messaging`, feature `nats`) is
//! audited like a call, once per delivery that reaches a decision, in the
//! same event shape: `subject` and `subject_kind` name its publisher (the
//! `sub` of the token it carried, or `anonymous`), `method` is `MESSAGE`,
//! `route` is the subscription's subject pattern
//! (`orders.v1.*.order.placed`), `account` and `permission` are those
//! filled from the message's subject, `decision` and `reason` as for a call
//! (`unauthenticated` with the token's reason code, `deny` with
//! `forbidden`, `rejected` with `invalid_subject`, `missing_event_id` or
//! `malformed_payload`, `allow` otherwise), `status` is 0 (messages have
//! none), `latency_ms` the time spent on the delivery, and `message` says
//! what became of it:
//!
//! | `message` field | example |
//! |---|---|
//! | `subject` | `orders.v1.67000001.order.placed` (the concrete subject) |
//! | `event_id` | `evt_0193…` (its `Nats-Msg-Id`, when it had a valid one) |
//! | `delivery` | `1` (JetStream's count of deliveries of this message) |
//! | `outcome` | `processed` (acknowledged), `retry` (handed back for a later delivery) or `dead_lettered` (moved to the dead-letter subject and never processed) |
//!
//! Auditing never blocks a request: events go through a bounded queue to a
//! writer thread, which sleeps while there is nothing to write (the first
//! event of a burst wakes it; it then gathers 10 ms of events and writes
//! them together). When the queue is full the event is dropped, **counted**
//! (`audit_events_dropped_total`) and logged, never silently lost; every
//! event is counted by decision (`audit_events_total{decision}`). Shutdown
//! flushes the queue. The default sink under the chassis' JSON log is the
//! exception to the queue: the log's own writer already never blocks (see
//! [`telemetry`](crate::telemetry)), so the line is formatted where the call
//! ends and handed to it directly, without a second hand-off and thread.
//!
//! # How the chassis does it
//!
//! The service builder puts [`AuditLayer`] around every API route, outside
//! the protection layers; the permission guard inside records the decision
//! into the request's audit note. Events go to an [`AuditSink`]: the default
//! [`LogSink`] writes one JSON log line per event under the `audit` target;
//! [`FileSink`] appends JSON lines to a file and syncs them to disk
//! (`CHASSIS_AUDIT_FILE`).
//!
//! # Example
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use chassis::audit::{AuditEvent, AuditSink, Auditor};
//!
//! #[derive(Clone, Default)]
//! struct Memory(Arc<Mutex<Vec<String>>>);
//! impl AuditSink for Memory {
//!     fn write(&self, events: &[AuditEvent]) -> std::io::Result<()> {
//!         let mut out = self.0.lock().unwrap();
//!         out.extend(events.iter().map(|e| e.decision.as_str().to_owned()));
//!         Ok(())
//!     }
//! }
//!
//! let memory = Memory::default();
//! let auditor = Auditor::new("ticketing", memory.clone(), 1024);
//! auditor.record(AuditEvent::example());
//! auditor.flush();
//! assert_eq!(*memory.0.lock().unwrap(), ["allow"]);
//! ```

use std::{
    fmt,
    future::Future,
    io::Write as _,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
    time::{Duration, SystemTime},
};

use axum::{extract::MatchedPath, response::Response};
use http::{Method, Request};
use pin_project_lite::pin_project;
use serde::Serialize;
use tokio::time::Instant;
use tower::{Layer, Service};

pub use crate::context::AuditDecision;
use crate::{
    context::{AuditNote, CorrelationId, HexId, RequestContext},
    permission::{AccountId, Permission},
};

/// Default queue length.
pub const DEFAULT_QUEUE: usize = 8192;
/// Events written per batch at most.
const BATCH: usize = 256;

/// One audit record; see the [module docs](self) for the fields.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEvent {
    /// When the call ended.
    #[serde(serialize_with = "serialize_time")]
    pub time: SystemTime,
    /// The service.
    pub service: Arc<str>,
    /// The correlation id.
    pub correlation_id: Option<CorrelationId>,
    /// The W3C trace id of the call, which finds its spans.
    pub trace_id: Option<HexId<32>>,
    /// The id of the call's server span.
    pub span_id: Option<HexId<16>>,
    /// The caller's `sub`, or `anonymous`.
    pub subject: Arc<str>,
    /// `user`, `service` or `anonymous`.
    pub subject_kind: &'static str,
    /// The HTTP method.
    #[serde(serialize_with = "serialize_method")]
    pub method: Method,
    /// The route template.
    pub route: AuditRoute,
    /// The API version called (`1` for `/ticketing/v1/...`), so that calls
    /// to a deprecated version are found by who made them; `None` for a
    /// message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_version: Option<u32>,
    /// The validated account, if the route has one.
    pub account: Option<AccountId>,
    /// The permission required, if one was.
    pub permission: Option<Permission>,
    /// The outcome.
    pub decision: AuditDecision,
    /// The reason code (`forbidden`, `expired`, `public`, `overloaded`, ...).
    pub reason: Option<&'static str>,
    /// The response status.
    pub status: u16,
    /// How long the call took, in milliseconds.
    pub latency_ms: f64,
    /// Whether it was a successful create, update or delete.
    pub mutation: bool,
    /// For a message, what became of it; `None` for an API call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<AuditMessage>,
}

/// What an audit event of a consumed message adds: see the
/// [module docs](self).
#[derive(Debug, Clone, Serialize)]
pub struct AuditMessage {
    /// The concrete subject it was published to.
    pub subject: Arc<str>,
    /// Its event id (`Nats-Msg-Id`), when it carried a valid one.
    pub event_id: Option<Arc<str>>,
    /// Which delivery of the message this was, from 1.
    pub delivery: u64,
    /// What became of it.
    pub outcome: MessageOutcome,
}

/// What became of a delivered message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageOutcome {
    /// Handled and acknowledged.
    Processed,
    /// Handed back to the broker for a later delivery.
    Retry,
    /// Moved to the dead-letter subject, never to be processed.
    DeadLettered,
}

impl MessageOutcome {
    /// `processed`, `retry` or `dead_lettered`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Processed => "processed",
            Self::Retry => "retry",
            Self::DeadLettered => "dead_lettered",
        }
    }
}

fn serialize_time<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    let mut buf = Vec::with_capacity(32);
    crate::log_line::write_rfc3339(&mut buf, *t);
    s.serialize_str(std::str::from_utf8(&buf).unwrap_or_default())
}

fn serialize_method<S: serde::Serializer>(m: &Method, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(m.as_str())
}

impl AuditEvent {
    /// A plausible allowed call, for examples and tests.
    #[doc(hidden)]
    pub fn example() -> Self {
        Self {
            time: SystemTime::UNIX_EPOCH,
            service: "ticketing".into(),
            correlation_id: CorrelationId::parse("example"),
            trace_id: Some(HexId::new(&[0xab; 16])),
            span_id: Some(HexId::new(&[0xcd; 8])),
            subject: "ann".into(),
            subject_kind: "user",
            method: Method::POST,
            route: AuditRoute::Static("/ticketing/v1/{account}/tickets"),
            api_version: Some(1),
            account: AccountId::parse("67000001").ok(),
            permission: "ticketing:67000001:create:ticket".parse().ok(),
            decision: AuditDecision::Allow,
            reason: None,
            status: 201,
            latency_ms: 1.0,
            mutation: true,
            message: None,
        }
    }
}

/// The route template of an audited call, shared with the router rather than
/// copied.
#[derive(Debug, Clone)]
pub enum AuditRoute {
    /// The matched route.
    Matched(MatchedPath),
    /// A fixed name (`unmatched`, or one given in code).
    Static(&'static str),
    /// A name made at run time: a subscription's subject pattern.
    Shared(Arc<str>),
}

impl AuditRoute {
    /// The template.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Matched(m) => m.as_str(),
            Self::Static(s) => s,
            Self::Shared(s) => s,
        }
    }
}

impl Serialize for AuditRoute {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Where audit events go. `write` runs on the audit thread, never on a
/// request's, so it may block (e.g. to sync a file).
pub trait AuditSink: Send + Sync + 'static {
    /// Writes a batch of events.
    ///
    /// # Errors
    ///
    /// An I/O error; the events are counted as dropped and logged.
    fn write(&self, events: &[AuditEvent]) -> std::io::Result<()>;

    /// Makes written events durable.
    ///
    /// # Errors
    ///
    /// An I/O error.
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes each event as a log line under the `audit` target (the default).
#[derive(Debug, Clone, Copy, Default)]
pub struct LogSink;

impl AuditSink for LogSink {
    fn write(&self, events: &[AuditEvent]) -> std::io::Result<()> {
        if let Some(lines) = crate::log_line::json_lines() {
            // The chassis' JSON log: the same lines as the `tracing` path
            // below, formatted here and handed over as one message per batch.
            if tracing::enabled!(target: "audit", tracing::Level::INFO) {
                let mut buf = Vec::with_capacity(events.len() * 400);
                for e in events {
                    log_line(lines, &mut buf, e);
                }
                lines.write(&buf);
            }
            return Ok(());
        }
        for e in events {
            tracing::info!(
                target: "audit",
                correlation_id = e.correlation_id.as_ref().map(CorrelationId::as_str),
                trace_id = e.trace_id.as_ref().map(HexId::as_str),
                span_id = e.span_id.as_ref().map(HexId::as_str),
                subject = &*e.subject,
                subject_kind = e.subject_kind,
                method = e.method.as_str(),
                route = e.route.as_str(),
                account = e.account.as_ref().map(AccountId::as_str),
                permission = e.permission.as_ref().map(Permission::as_str),
                decision = e.decision.as_str(),
                reason = e.reason,
                status = e.status,
                latency_ms = e.latency_ms,
                mutation = e.mutation,
                message_subject = e.message.as_ref().map(|m| &*m.subject),
                message_event_id = e.message.as_ref().and_then(|m| m.event_id.as_deref()),
                message_delivery = e.message.as_ref().map(|m| m.delivery),
                message_outcome = e.message.as_ref().map(|m| m.outcome.as_str()),
                "audit"
            );
        }
        Ok(())
    }
}

/// One audit event as a line of the JSON log, with the fields and order of
/// the `tracing` event in [`LogSink`]; absent values are left out.
fn log_line(lines: &crate::log_line::JsonLines, buf: &mut Vec<u8>, e: &AuditEvent) {
    use crate::log_line::{write_field, write_u64};
    // `escape` is false for values whose types cannot hold text that needs
    // it: validated grammars (correlation id, account, permission), HTTP
    // methods and the decision.
    lines.begin_line(buf, e.time, "audit", None, "audit");
    if let Some(id) = &e.correlation_id {
        write_field(buf, ",\"correlation_id\":\"", id.as_str(), false);
    }
    if let Some(id) = &e.trace_id {
        write_field(buf, ",\"trace_id\":\"", id.as_str(), false);
    }
    if let Some(id) = &e.span_id {
        write_field(buf, ",\"span_id\":\"", id.as_str(), false);
    }
    write_field(buf, ",\"subject\":\"", &e.subject, true);
    write_field(buf, ",\"subject_kind\":\"", e.subject_kind, true);
    write_field(buf, ",\"method\":\"", e.method.as_str(), false);
    let route_clean = match &e.route {
        AuditRoute::Matched(m) => crate::log_line::route_is_clean(m),
        AuditRoute::Static(_) | AuditRoute::Shared(_) => false,
    };
    write_field(buf, ",\"route\":\"", e.route.as_str(), !route_clean);
    if let Some(v) = e.api_version {
        buf.extend_from_slice(b",\"api_version\":");
        write_u64(buf, u64::from(v));
    }
    if let Some(account) = &e.account {
        write_field(buf, ",\"account\":\"", account.as_str(), false);
    }
    if let Some(permission) = &e.permission {
        write_field(buf, ",\"permission\":\"", permission.as_str(), false);
    }
    write_field(buf, ",\"decision\":\"", e.decision.as_str(), false);
    if let Some(reason) = e.reason {
        write_field(buf, ",\"reason\":\"", reason, true);
    }
    buf.extend_from_slice(b",\"status\":");
    write_u64(buf, u64::from(e.status));
    if e.latency_ms.is_finite() && e.latency_ms >= 0.0 {
        // Milliseconds to the microsecond, without float formatting.
        let micros = (e.latency_ms * 1000.0).round() as u64;
        buf.extend_from_slice(b",\"latency_ms\":");
        write_u64(buf, micros / 1000);
        let frac = micros % 1000;
        buf.extend_from_slice(&[
            b'.',
            b'0' + (frac / 100) as u8,
            b'0' + (frac / 10 % 10) as u8,
            b'0' + (frac % 10) as u8,
        ]);
    }
    buf.extend_from_slice(if e.mutation {
        b",\"mutation\":true"
    } else {
        b",\"mutation\":false"
    });
    if let Some(m) = &e.message {
        write_field(buf, ",\"message\":{\"subject\":\"", &m.subject, true);
        if let Some(id) = &m.event_id {
            write_field(buf, ",\"event_id\":\"", id, true);
        }
        buf.extend_from_slice(b",\"delivery\":");
        write_u64(buf, m.delivery);
        write_field(buf, ",\"outcome\":\"", m.outcome.as_str(), false);
        buf.push(b'}');
    }
    crate::log_line::JsonLines::end_line(buf);
}

/// Appends events as JSON lines to a file, synced to disk after each batch.
#[derive(Debug)]
pub struct FileSink {
    path: PathBuf,
    file: Mutex<std::fs::File>,
}

impl FileSink {
    /// Opens (or creates) `path` for appending.
    ///
    /// # Errors
    ///
    /// If the file cannot be opened.
    pub fn open(path: impl AsRef<Path>) -> std::io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        Ok(Self {
            path,
            file: Mutex::new(file),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl AuditSink for FileSink {
    fn write(&self, events: &[AuditEvent]) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(events.len() * 320);
        for e in events {
            serde_json::to_writer(&mut buf, e)?;
            buf.push(b'\n');
        }
        let mut file = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        file.write_all(&buf)?;
        file.sync_data()
    }
}

/// How long the writer thread gathers events after the first of a burst
/// woke it, unless the queue fills to half first.
const DRAIN_INTERVAL: Duration = Duration::from_millis(10);

/// The queue in front of a sink, and the thread that drains it.
///
/// Recording pushes onto a buffer under a short lock. The writer thread
/// sleeps while the queue is empty; the first event of a burst wakes it, and
/// it then gathers for 10 ms (or until the queue is half full) before it
/// writes, so at most one request per burst pays for waking it, and an idle
/// service (or one whose audit lines go straight to the JSON log) has a
/// writer that does not wake at all. Cheap to clone. Dropping the last clone
/// stops the thread after it has written what is queued.
#[derive(Clone)]
pub struct Auditor {
    inner: Arc<AuditorInner>,
}

struct AuditorInner {
    service: Arc<str>,
    queue: Arc<Queue>,
    dropped: AtomicU64,
    counters: [metrics::Counter; 4],
    dropped_counter: metrics::Counter,
    /// Whether the sink is [`LogSink`], whose lines go straight to the
    /// chassis' JSON log when it is installed (see [`Auditor::record`]).
    log_sink: bool,
}

struct Queue {
    state: Mutex<QueueState>,
    wake: std::sync::Condvar,
    done: std::sync::Condvar,
    capacity: usize,
}

#[derive(Default)]
struct QueueState {
    events: Vec<AuditEvent>,
    /// Flushes asked for, and flushes done (a flush waits for `done` to pass
    /// its ticket).
    flush_asked: u64,
    flush_done: u64,
    closed: bool,
    /// The writer is asleep until an event, a flush or the close wakes it.
    parked: bool,
}

impl Drop for AuditorInner {
    fn drop(&mut self) {
        let mut s = self
            .queue
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        s.closed = true;
        self.queue.wake.notify_all();
    }
}

impl fmt::Debug for Auditor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auditor")
            .field("service", &self.inner.service)
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

impl Auditor {
    /// Starts the writer thread for `sink` with a queue of `capacity` events.
    pub fn new<S: AuditSink>(service: &str, sink: S, capacity: usize) -> Self {
        let log_sink = std::any::TypeId::of::<S>() == std::any::TypeId::of::<LogSink>();
        let capacity = capacity.max(1);
        let queue = Arc::new(Queue {
            state: Mutex::new(QueueState {
                events: Vec::with_capacity(capacity.min(BATCH)),
                ..QueueState::default()
            }),
            wake: std::sync::Condvar::new(),
            done: std::sync::Condvar::new(),
            capacity,
        });
        let service: Arc<str> = service.into();
        let counter = |decision: AuditDecision| metrics::counter!("audit_events_total", "service" => service.to_string(), "decision" => decision.as_str());
        let counters = [
            counter(AuditDecision::Allow),
            counter(AuditDecision::Deny),
            counter(AuditDecision::Unauthenticated),
            counter(AuditDecision::Rejected),
        ];
        let dropped_counter =
            metrics::counter!("audit_events_dropped_total", "service" => service.to_string());
        let thread_dropped = dropped_counter.clone();
        let thread_queue = queue.clone();
        std::thread::Builder::new()
            .name("chassis-audit".to_owned())
            .spawn(move || drain(&thread_queue, &sink, &thread_dropped))
            .expect("the audit thread can be spawned");
        Self {
            inner: Arc::new(AuditorInner {
                service,
                queue,
                dropped: AtomicU64::new(0),
                counters,
                dropped_counter,
                log_sink,
            }),
        }
    }

    /// The service.
    pub fn service(&self) -> &Arc<str> {
        &self.inner.service
    }

    /// Queues an event; never blocks on the sink. A full queue drops it,
    /// counted. With [`LogSink`] under the chassis' JSON log, the line is
    /// written to the log here instead: the log's writer buffers it without
    /// blocking, so the queue and the writer thread would only add a second
    /// hand-off (and free the event's memory on another thread).
    pub fn record(&self, event: AuditEvent) {
        self.inner.counters[event.decision as usize].increment(1);
        if self.inner.log_sink
            && let Some(lines) = crate::log_line::json_lines()
        {
            if tracing::enabled!(target: "audit", tracing::Level::INFO) {
                crate::log_line::with_line(|buf| {
                    log_line(lines, buf, &event);
                    lines.write(buf);
                });
            }
            return;
        }
        let q = &self.inner.queue;
        let mut s = q
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if s.events.len() >= q.capacity {
            drop(s);
            let n = self.inner.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            self.inner.dropped_counter.increment(1);
            if n == 1 || n.is_power_of_two() {
                tracing::warn!(dropped_total = n, "audit queue full; event dropped");
            }
            return;
        }
        s.events.push(event);
        if std::mem::take(&mut s.parked) || s.events.len() == q.capacity.div_ceil(2) {
            q.wake.notify_one();
        }
    }

    /// Events dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// Waits (at most 30 s) until everything queued so far is written and
    /// flushed.
    pub fn flush(&self) {
        let q = &self.inner.queue;
        let mut s = q
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        s.flush_asked += 1;
        let ticket = s.flush_asked;
        q.wake.notify_one();
        // At most 30 s, in steps, so no clock is read on this path.
        for _ in 0..300 {
            if s.flush_done >= ticket {
                return;
            }
            s = q
                .done
                .wait_timeout(s, Duration::from_millis(100))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        if s.flush_done < ticket {
            tracing::error!("audit flush timed out");
        }
    }
}

fn drain(q: &Queue, sink: &dyn AuditSink, dropped: &metrics::Counter) {
    let mut batch: Vec<AuditEvent> = Vec::new();
    loop {
        let (closed, asked) = {
            let mut s = q
                .state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let idle = |s: &QueueState| s.flush_asked == s.flush_done && !s.closed;
            if s.events.is_empty() && idle(&s) {
                // Asleep until the first event of a burst (or a flush, or
                // the close) wakes it.
                s.parked = true;
                while s.parked && s.events.is_empty() && idle(&s) {
                    s = q
                        .wake
                        .wait(s)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                s.parked = false;
                // Then gather the rest of the burst; a half-full queue, a
                // flush or the close cut this short.
                if idle(&s) && s.events.len() < q.capacity.div_ceil(2) {
                    s = q
                        .wake
                        .wait_timeout(s, DRAIN_INTERVAL)
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0;
                }
            }
            std::mem::swap(&mut batch, &mut s.events);
            (s.closed, s.flush_asked)
        };
        for chunk in batch.chunks(BATCH) {
            if let Err(e) = sink.write(chunk) {
                dropped.increment(chunk.len() as u64);
                tracing::error!(error = %e, events = chunk.len(), "audit sink failed; events dropped");
            }
        }
        batch.clear();
        let mut s = q
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if asked > s.flush_done && s.events.is_empty() {
            drop(s);
            if let Err(e) = sink.flush() {
                tracing::error!(error = %e, "audit sink flush failed");
            }
            s = q
                .state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            s.flush_done = asked;
            q.done.notify_all();
        }
        if closed && s.events.is_empty() {
            return;
        }
    }
}

/// Layer that writes one audit event per call; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct AuditLayer {
    auditor: Auditor,
    api_version: Option<u32>,
}

impl AuditLayer {
    /// Records into `auditor`.
    pub fn new(auditor: Auditor) -> Self {
        Self {
            auditor,
            api_version: None,
        }
    }

    /// Records `version` as the `api_version` of every call, for a layer
    /// around the routes of that version (the service builder puts one
    /// around each version's routes).
    #[must_use]
    pub fn api_version(mut self, version: u32) -> Self {
        self.api_version = Some(version);
        self
    }
}

impl<S> Layer<S> for AuditLayer {
    type Service = Audit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Audit {
            inner,
            auditor: self.auditor.clone(),
            api_version: self.api_version,
        }
    }
}

/// Service built by [`AuditLayer`].
#[derive(Debug, Clone)]
pub struct Audit<S> {
    inner: S,
    auditor: Auditor,
    api_version: Option<u32>,
}

impl<S> Audit<S> {
    define_inner_service_accessors!();
}

impl<S, B> Service<Request<B>> for Audit<S>
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

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let pending = Pending::begin(&self.auditor, self.api_version, &mut req);
        ResponseFuture {
            inner: self.inner.call(req),
            pending: Some(pending),
        }
    }
}

/// A call in progress; records its event when dropped (a call cut short by
/// its client is recorded with status 499).
pub(crate) struct Pending {
    start: Instant,
    method: Method,
    route: Option<MatchedPath>,
    api_version: Option<u32>,
    correlation_id: Option<CorrelationId>,
    trace_id: Option<HexId<32>>,
    span_id: Option<HexId<16>>,
    note: AuditNote,
    auditor: Auditor,
    status: Option<u16>,
}

impl Pending {
    /// Starts auditing `req`: its [`AuditNote`] goes into the request for the
    /// guard to fill in; `api_version` is the version of the route's API.
    pub(crate) fn begin<B>(
        auditor: &Auditor,
        api_version: Option<u32>,
        req: &mut Request<B>,
    ) -> Self {
        let method = req.method().clone();
        let route = req.extensions().get::<MatchedPath>().cloned();
        let (start, correlation_id, trace_id, span_id, note) = RequestContext::with(req, |ctx| {
            (
                ctx.received(),
                Some(ctx.id().clone()),
                Some(ctx.trace().trace_id()),
                Some(ctx.trace().span_id()),
                ctx.note().clone(),
            )
        });
        Self {
            start,
            method,
            route,
            api_version,
            correlation_id,
            trace_id,
            span_id,
            note,
            auditor: auditor.clone(),
            status: None,
        }
    }

    /// When the call started.
    pub(crate) fn start(&self) -> Instant {
        self.start
    }

    /// Notes the status the call was answered with (500 for an error of the
    /// service); the event is recorded when `self` is dropped.
    pub(crate) fn answered<E>(&mut self, result: &Result<Response, E>) {
        self.status = Some(result.as_ref().map_or(500, |r| r.status().as_u16()));
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let status = self.status.unwrap_or(499);
        let note = self.note.take();
        let (decision, reason) = note
            .decision
            .unwrap_or_else(|| (AuditDecision::Rejected, Some(rejected_reason(status))));
        let (subject, subject_kind) = match &note.principal {
            Some(p) => (p.subject_arc(), p.kind().as_str()),
            None => (anonymous(), "anonymous"),
        };
        let mutation = matches!(
            self.method,
            Method::POST | Method::PUT | Method::PATCH | Method::DELETE
        ) && (200..300).contains(&status)
            && decision == AuditDecision::Allow;
        self.auditor.record(AuditEvent {
            time: SystemTime::now(),
            service: self.auditor.service().clone(),
            correlation_id: self.correlation_id.take(),
            trace_id: self.trace_id,
            span_id: self.span_id,
            subject,
            subject_kind,
            method: std::mem::replace(&mut self.method, Method::GET),
            route: self
                .route
                .take()
                .map_or(AuditRoute::Static("unmatched"), AuditRoute::Matched),
            api_version: self.api_version,
            account: note.account,
            permission: note.permission,
            decision,
            reason,
            status,
            latency_ms: self.start.elapsed().as_secs_f64() * 1000.0,
            mutation,
            message: None,
        });
    }
}

/// The shared `anonymous` subject.
fn anonymous() -> Arc<str> {
    static ANONYMOUS: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
    ANONYMOUS.get_or_init(|| Arc::from("anonymous")).clone()
}

/// The reason of a call refused before any decision, from its status.
fn rejected_reason(status: u16) -> &'static str {
    match status {
        404 => "invalid_path",
        405 => "method_not_allowed",
        408 | 504 => "timeout",
        413 => "too_large",
        499 => "client_closed",
        503 => "overloaded",
        s if s >= 500 => "error",
        _ => "bad_request",
    }
}

pin_project! {
    /// Response future of [`Audit`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        pending: Option<Pending>,
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
        let result = ready!(this.inner.poll(cx));
        if let Some(pending) = this.pending.as_mut() {
            pending.answered(&result);
            // Recorded in place, without moving the call out first.
            *this.pending = None;
        }
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Memory(Arc<Mutex<Vec<AuditEvent>>>);

    impl AuditSink for Memory {
        fn write(&self, events: &[AuditEvent]) -> std::io::Result<()> {
            self.0.lock().unwrap().extend_from_slice(events);
            Ok(())
        }
    }

    /// A sink that blocks until released.
    #[derive(Clone)]
    struct Stuck(Arc<(Mutex<bool>, std::sync::Condvar)>, Memory);

    impl AuditSink for Stuck {
        fn write(&self, events: &[AuditEvent]) -> std::io::Result<()> {
            let (lock, cvar) = &*self.0;
            let mut open = lock.lock().unwrap();
            while !*open {
                open = cvar.wait(open).unwrap();
            }
            self.1.write(events)
        }
    }

    #[test]
    fn log_lines_carry_every_field_of_the_event() {
        let (writer, _guard) = crate::log_line::LogWriter::spawn(std::io::sink(), |_| Vec::new());
        let lines = crate::log_line::JsonLines::new("ticketing", writer);
        let mut buf = Vec::new();
        let allowed = AuditEvent {
            latency_ms: 12.345_678,
            ..AuditEvent::example()
        };
        let refused = AuditEvent {
            correlation_id: None,
            trace_id: None,
            span_id: None,
            subject: "a \"quoted\"\nname".into(),
            account: None,
            permission: None,
            decision: AuditDecision::Unauthenticated,
            reason: Some("missing_token"),
            status: 401,
            latency_ms: 0.000_4,
            mutation: false,
            ..AuditEvent::example()
        };
        log_line(&lines, &mut buf, &allowed);
        log_line(&lines, &mut buf, &refused);
        let text = String::from_utf8(buf).unwrap();
        let parsed: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(parsed.len(), 2, "{text}");
        assert_eq!(
            parsed[0],
            serde_json::json!({
                "time": "1970-01-01T00:00:00.000000Z", "level": "INFO", "target": "audit",
                "service": "ticketing", "message": "audit", "correlation_id": "example",
                "trace_id": "abababababababababababababababab",
                "span_id": "cdcdcdcdcdcdcdcd",
                "subject": "ann", "subject_kind": "user", "method": "POST",
                "route": "/ticketing/v1/{account}/tickets", "api_version": 1, "account": "67000001",
                "permission": "ticketing:67000001:create:ticket", "decision": "allow",
                "status": 201, "latency_ms": 12.346, "mutation": true,
            })
        );
        let r = &parsed[1];
        assert_eq!(r["subject"], "a \"quoted\"\nname");
        assert_eq!(
            (r["decision"].as_str(), r["reason"].as_str()),
            (Some("unauthenticated"), Some("missing_token"))
        );
        assert_eq!(
            (r["status"].as_u64(), r["latency_ms"].as_f64()),
            (Some(401), Some(0.0))
        );
        for absent in [
            "correlation_id",
            "trace_id",
            "span_id",
            "account",
            "permission",
        ] {
            assert!(r.get(absent).is_none(), "{absent}: {r}");
        }
        let mut n = Vec::new();
        crate::log_line::write_u64(&mut n, 0);
        n.push(b' ');
        crate::log_line::write_u64(&mut n, u64::MAX);
        assert_eq!(n, b"0 18446744073709551615");
    }

    #[test]
    fn a_message_decision_logs_its_message_as_the_file_sink_writes_it() {
        let (writer, _guard) = crate::log_line::LogWriter::spawn(std::io::sink(), |_| Vec::new());
        let lines = crate::log_line::JsonLines::new("mail", writer);
        let event = AuditEvent {
            method: Method::from_bytes(b"MESSAGE").unwrap(),
            route: AuditRoute::Shared("orders.v1.*.order.placed".into()),
            api_version: None,
            subject: "orders".into(),
            subject_kind: "service",
            permission: "mail:67000001:send:message".parse().ok(),
            decision: AuditDecision::Deny,
            reason: Some("forbidden"),
            status: 0,
            mutation: false,
            message: Some(AuditMessage {
                subject: "orders.v1.67000001.order.placed".into(),
                event_id: Some("evt-\"1\"".into()),
                delivery: 2,
                outcome: MessageOutcome::DeadLettered,
            }),
            ..AuditEvent::example()
        };
        let mut buf = Vec::new();
        log_line(&lines, &mut buf, &event);
        let logged: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        let expected = serde_json::json!({
            "subject": "orders.v1.67000001.order.placed",
            "event_id": "evt-\"1\"",
            "delivery": 2,
            "outcome": "dead_lettered",
        });
        assert_eq!(logged["message"], expected, "{logged}");
        assert_eq!(logged["method"], "MESSAGE");
        assert_eq!(logged["route"], "orders.v1.*.order.placed");
        // The file sink (serde) writes the same object.
        let filed = serde_json::to_value(&event).unwrap();
        assert_eq!(filed["message"], expected);
        let call = serde_json::to_value(AuditEvent::example()).unwrap();
        assert!(call.get("message").is_none(), "{call}");
    }

    #[test]
    fn a_stuck_sink_never_blocks_and_drops_are_counted() {
        let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let memory = Memory::default();
        let auditor = Auditor::new("svc", Stuck(gate.clone(), memory.clone()), 4);
        for _ in 0..100 {
            auditor.record(AuditEvent::example());
        }
        // Only the queue (4) and the batch in the sink's hands got through.
        let dropped = auditor.dropped();
        assert!(dropped >= 88, "dropped {dropped}");
        {
            let (lock, cvar) = &*gate;
            *lock.lock().unwrap() = true;
            cvar.notify_all();
        }
        auditor.flush();
        assert_eq!(memory.0.lock().unwrap().len() as u64, 100 - dropped);
    }

    #[test]
    fn an_idle_writer_is_woken_by_the_first_event_of_a_burst() {
        let memory = Memory::default();
        let auditor = Auditor::new("svc", memory.clone(), 100);
        for burst in 1..=3 {
            // Long enough for the writer to go back to sleep.
            std::thread::sleep(Duration::from_millis(50));
            auditor.record(AuditEvent::example());
            // Written without a flush: the event itself woke the writer.
            let mut waited = 0;
            while memory.0.lock().unwrap().len() < burst {
                assert!(waited < 500, "burst {burst} was not written");
                std::thread::sleep(Duration::from_millis(10));
                waited += 1;
            }
        }
        assert_eq!(auditor.dropped(), 0);
    }

    #[test]
    fn flush_writes_everything_queued() {
        let memory = Memory::default();
        let auditor = Auditor::new("svc", memory.clone(), 10_000);
        for _ in 0..5000 {
            auditor.record(AuditEvent::example());
        }
        auditor.flush();
        assert_eq!(memory.0.lock().unwrap().len(), 5000);
        assert_eq!(auditor.dropped(), 0);
    }

    #[test]
    fn file_sink_appends_json_lines() {
        let dir = std::env::temp_dir().join(format!("chassis-audit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.jsonl");
        let _ = std::fs::remove_file(&path);
        let auditor = Auditor::new("svc", FileSink::open(&path).unwrap(), 16);
        auditor.record(AuditEvent::example());
        let mut denied = AuditEvent::example();
        denied.decision = AuditDecision::Deny;
        denied.reason = Some("forbidden");
        denied.mutation = false;
        denied.status = 403;
        auditor.record(denied);
        auditor.flush();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["decision"], "allow");
        assert_eq!(lines[0]["permission"], "ticketing:67000001:create:ticket");
        assert_eq!(lines[0]["time"], "1970-01-01T00:00:00.000000Z");
        assert_eq!(lines[1]["decision"], "deny");
        assert_eq!(lines[1]["reason"], "forbidden");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
