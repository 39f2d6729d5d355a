//! The export pipeline: finished spans go through a bounded queue to a
//! thread of their own, which sends them in batches to an OTLP/HTTP
//! collector.
//!
//! The request path must never wait for a collector. So [`record`] does one
//! non-blocking `try_send` into a bounded queue whose slots are allocated
//! when the pipeline starts, and when the queue is full the span is dropped
//! and counted; nothing else happens where the span ends. Everything slow
//! (protobuf encoding, connections, TLS, waiting for the collector) happens
//! on one OS thread that runs a current-thread tokio runtime of its own:
//! it does not depend on the runtime of whoever started it (a test makes
//! one runtime per test), and [`Tracing::shutdown`] can let it flush within
//! a grace period whatever the caller's runtime does.
//!
//! The SDK's own `BatchSpanProcessor` does not fit: it counts the spans it
//! drops only in a private atomic, cannot run an async HTTP client on its
//! thread, and ignores its export timeout. Its protobuf encoding and its
//! OTLP semantics are reused through `opentelemetry_otlp::SpanExporter`,
//! over this module's own [`HttpClient`] on hyper-util (no reqwest), which
//! bounds every attempt by the export timeout itself.
//!
//! The exporter retries at most once, and only what OTLP calls retryable
//! (429, 502, 503, 504, no answer), 250 to 375 ms later (jittered, so that
//! replicas do not retry in step; a longer `Retry-After` is honoured if the
//! timeout leaves room for it). No retry starts after the export timeout,
//! and each attempt is bounded by it, so a dead or hung collector costs at
//! most about two timeouts per batch: the queue behind it fills and drops
//! (counted) instead of growing, and the thread never falls more than a
//! queue behind. The SDK's default (three retries) would rescue a batch
//! across a short collector restart, at the price of stalling every later
//! batch as long: spans are cheaper to lose than to queue without bound.

use std::{
    collections::BTreeMap,
    fmt,
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use metrics::Counter;
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HttpClient, HttpError, ResponseBodyTooLarge};
use opentelemetry_otlp::{Protocol, RetryPolicy, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    resource::TelemetryResourceDetector,
    trace::{SdkTracerProvider, Span, SpanData, SpanExporter, SpanProcessor},
};
use tokio::{
    sync::{Notify, mpsc, oneshot},
    time::Instant,
};

use super::TraceSettings;

/// Spans the collector accepted.
pub(crate) const SPANS_EXPORTED: &str = "otel_spans_exported_total";
/// Spans that never reached the collector, by `reason`.
pub(crate) const SPANS_DROPPED: &str = "otel_spans_dropped_total";
/// Export requests that failed (after the retry).
pub(crate) const EXPORT_FAILURES: &str = "otel_export_failures_total";

/// The largest collector answer read: an `ExportTraceServiceResponse` is a
/// few bytes; 4 MiB is what the OpenTelemetry clients allow.
const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;
/// The pause before the one retry of a retryable failure, plus up to half
/// as much again of jitter.
const RETRY_AFTER: Duration = Duration::from_millis(250);

/// Whether a pipeline is installed; read on the request path.
static ENABLED: AtomicBool = AtomicBool::new(false);
/// The installed pipeline, which [`record`] sends to.
static CURRENT: RwLock<Option<Arc<Pipeline>>> = RwLock::new(None);

/// What the resource says of the service unless `OTEL_*` says otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceInfo {
    /// `service.name`; `OTEL_RESOURCE_ATTRIBUTES` and then
    /// `OTEL_SERVICE_NAME` override it.
    pub service_name: String,
    /// `service.version` (left out when empty).
    pub service_version: String,
    /// `service.instance.id`: this process among the service's replicas
    /// (left out when empty).
    pub instance_id: String,
}

/// The running export pipeline: its queue, its thread, and a tracer
/// provider for handler code.
///
/// [`start`](Self::start) installs it for the whole process. From then on
/// every sampled span the chassis finishes, and every span of
/// [`provider`](Self::provider)'s tracers, is queued (never waiting: a full
/// queue drops the span) and sent in batches of
/// `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`, as soon as a batch is full or
/// `OTEL_BSP_SCHEDULE_DELAY` after the last export, to the endpoint of
/// [`TraceSettings`], over OTLP/HTTP with protobuf. Each export request
/// takes at most `OTEL_EXPORTER_OTLP_TIMEOUT`; one that fails with a
/// retryable answer (429, 502, 503, 504, or none) is retried once, 250 to
/// 375 ms later, if the timeout is not spent. Call [`shutdown`](Self::shutdown) when
/// the service stops, so that what is queued is sent; dropping the handle
/// stops the pipeline too, sending what is queued in the background within
/// the export timeout.
///
/// The pipeline counts, labelled `service` (see
/// [`service_label`](crate::metrics::service_label)):
///
/// | metric | labels | counts |
/// |---|---|---|
/// | `otel_spans_exported_total` | `service` | spans the collector accepted |
/// | `otel_spans_dropped_total` | `service`, `reason` | spans lost: `queue_full` (the queue was full when the span ended), `export_failed` (their export request failed), `shutdown` (still queued or being sent when the shutdown grace ran out) |
/// | `otel_export_failures_total` | `service` | export requests that failed |
///
/// The counters are registered with the `metrics` recorder that is current
/// when the pipeline starts: install the recorder first
/// ([`install_recorder`](crate::metrics::install_recorder)). Failures are also logged, once when exports start
/// failing and once when they work again; drops for a full queue are
/// logged as their count doubles.
///
/// ```
/// use chassis::config::{Env, Reader};
/// use chassis::otel::{ResourceInfo, TraceSettings, Tracing};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let env = Env::from_pairs([("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")]);
/// let settings = TraceSettings::read(&mut Reader::new(&env));
/// let resource = ResourceInfo {
///     service_name: "orders".to_owned(),
///     service_version: "1.4.2".to_owned(),
///     instance_id: "orders-7f9c".to_owned(),
/// };
/// let tracing = Tracing::start(&settings, resource).expect("an endpoint is set");
///
/// // Handler code may use the OpenTelemetry API; its spans share the queue.
/// use opentelemetry::trace::{Tracer, TracerProvider};
/// let tracer = tracing.provider().tracer("orders");
/// tracer.in_span("price the order", |_cx| {});
///
/// tracing.shutdown(std::time::Duration::from_secs(1)).await;
///
/// // Without an endpoint nothing starts, and nothing is paid for.
/// assert!(Tracing::start(&TraceSettings::off(), ResourceInfo {
///     service_name: "orders".to_owned(),
///     service_version: String::new(),
///     instance_id: String::new(),
/// }).is_none());
/// # }
/// ```
pub struct Tracing {
    pipeline: Arc<Pipeline>,
    provider: SdkTracerProvider,
    endpoint: String,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The grace of a drop without [`shutdown`](Self::shutdown).
    timeout: Duration,
}

/// What [`record`], the provider's processor and the export thread share.
struct Pipeline {
    queue: SyncSender<SpanData>,
    /// Whether spans are still taken; cleared first on shutdown.
    open: AtomicBool,
    /// Spans queued so far, to wake the thread once per full batch.
    queued: AtomicUsize,
    batch: usize,
    /// Wakes the thread: a batch is full, or a flush was asked for.
    wake: Notify,
    /// Set with `wake` when everything queued should go now.
    flush: AtomicBool,
    /// Spans dropped because the queue was full, for the thread's log.
    full_drops: AtomicU64,
    control: mpsc::UnboundedSender<Control>,
    counters: Counters,
}

/// The pipeline's metric handles, resolved once at start.
#[derive(Clone)]
struct Counters {
    exported: Counter,
    queue_full: Counter,
    export_failed: Counter,
    shutdown: Counter,
    failures: Counter,
}

/// What the export thread does when woken.
enum Work {
    /// A batch is full: export the full ones.
    FullBatches,
    /// A flush was asked for: export everything.
    Everything,
    /// The schedule: export everything, and log drops.
    Scheduled,
}

/// What the export thread is told.
enum Control {
    /// Send everything queued within `grace`, then stop; say so on `done`.
    Shutdown {
        grace: Duration,
        done: Option<oneshot::Sender<()>>,
    },
}

/// The tracer provider's processor: every span it ends goes to the same
/// queue as [`record`]'s.
#[derive(Debug)]
struct QueueProcessor(Arc<Pipeline>);

/// The exporter's HTTP client: hyper-util's pool, TLS through the chassis'
/// transport when built, every attempt bounded by the export timeout.
struct OtlpHttpClient {
    client: Client<Connector, Full<Bytes>>,
    timeout: Duration,
    /// The cause of the last failed attempt, for the thread's log (the
    /// exporter keeps only "network error").
    last_error: Arc<Mutex<Option<String>>>,
}

#[cfg(feature = "tls")]
type Connector = hyper_rustls::HttpsConnector<HttpConnector>;
#[cfg(not(feature = "tls"))]
type Connector = HttpConnector;

/// The export thread's state.
struct Worker {
    queue: Receiver<SpanData>,
    pipeline: Arc<Pipeline>,
    exporter: opentelemetry_otlp::SpanExporter,
    batch: Vec<SpanData>,
    batch_size: usize,
    capacity: usize,
    delay: Duration,
    timeout: Duration,
    /// Spans handed to the exporter and not yet answered for.
    in_flight: usize,
    failing: bool,
    last_error: Arc<Mutex<Option<String>>>,
    /// `full_drops` when last logged.
    logged_full: u64,
}

// === impl Tracing ===

impl fmt::Debug for Tracing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracing")
            .field("endpoint", &self.endpoint)
            .field("batch", &self.pipeline.batch)
            .field("open", &self.pipeline.open.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Tracing {
    /// Starts the pipeline for `settings`, with `resource` as the
    /// resource's defaults, and installs it as the process's current one
    /// (replacing any earlier one, which keeps running until it is shut
    /// down but no longer receives the chassis' spans).
    ///
    /// `None` when `settings` exports nothing; also when the export thread
    /// or its runtime cannot be made (the operating system is out of
    /// threads or descriptors), which is logged: a service runs without
    /// traces rather than not at all.
    pub fn start(settings: &TraceSettings, resource: ResourceInfo) -> Option<Tracing> {
        if !settings.exports() {
            return None;
        }
        let endpoint = settings.endpoint()?.to_owned();
        match Self::try_start(settings, resource, &endpoint) {
            Ok(tracing) => Some(tracing),
            Err(e) => {
                tracing::error!(error = %e, endpoint, "trace export could not start; spans will not be exported");
                None
            }
        }
    }

    fn try_start(
        settings: &TraceSettings,
        info: ResourceInfo,
        endpoint: &str,
    ) -> Result<Self, crate::BoxError> {
        let resource = resource(settings, info);
        let last_error = Arc::new(Mutex::new(None));
        let client = OtlpHttpClient::new(settings.timeout(), last_error.clone());
        let headers = settings
            .headers()
            .iter()
            .map(|(k, v)| (k.clone(), v.expose().clone()))
            .collect();
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(endpoint)
            .with_protocol(Protocol::HttpBinary)
            .with_timeout(settings.timeout())
            .with_headers(headers)
            .with_retry_policy(
                RetryPolicy::recommended()
                    .with_max_retries(1)
                    .with_initial_delay(RETRY_AFTER)
                    .with_max_delay(RETRY_AFTER * 2)
                    .with_max_jitter(RETRY_AFTER / 2),
            )
            .with_http_client(client)
            .build()?;
        exporter.set_resource(&resource);

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let capacity = settings.max_queue_size().max(1);
        let batch_size = settings.max_export_batch_size().clamp(1, capacity);
        let (queue, receiver) = std::sync::mpsc::sync_channel(capacity);
        let (control, control_rx) = mpsc::unbounded_channel();
        let pipeline = Arc::new(Pipeline {
            queue,
            open: AtomicBool::new(true),
            queued: AtomicUsize::new(0),
            batch: batch_size,
            wake: Notify::new(),
            flush: AtomicBool::new(false),
            full_drops: AtomicU64::new(0),
            control,
            counters: Counters::new(),
        });
        let worker = Worker {
            queue: receiver,
            pipeline: pipeline.clone(),
            exporter,
            batch: Vec::with_capacity(batch_size),
            batch_size,
            capacity,
            delay: settings.schedule_delay(),
            timeout: settings.timeout(),
            in_flight: 0,
            failing: false,
            last_error,
            logged_full: 0,
        };
        let thread = std::thread::Builder::new()
            .name("chassis-otel-export".to_owned())
            .spawn(move || runtime.block_on(worker.run(control_rx)))?;

        let provider = SdkTracerProvider::builder()
            .with_span_processor(QueueProcessor(pipeline.clone()))
            .with_sampler(settings.sampler().to_sdk())
            .with_resource(resource)
            .build();

        install(pipeline.clone());
        Ok(Self {
            pipeline,
            provider,
            endpoint: endpoint.to_owned(),
            thread: Some(thread),
            timeout: settings.timeout(),
        })
    }

    /// Stops taking spans, sends what is queued within `grace`, and
    /// uninstalls the pipeline (if it is still the current one). Spans that
    /// end afterwards are dropped without being counted; spans still queued
    /// or being sent when `grace` runs out are counted as dropped
    /// (`shutdown`). The provider is shut down too: its tracers make no
    /// more spans.
    ///
    /// The grace is kept by the export thread, on its own clock, so this
    /// returns on time whatever the caller's runtime is doing, including a
    /// test's paused clock.
    pub async fn shutdown(mut self, grace: Duration) {
        let (done, stopped) = oneshot::channel();
        self.close(grace, Some(done));
        // An error means the thread ended without answering (it
        // panicked): there is nothing left to wait for.
        let _ = stopped.await;
    }

    /// An OpenTelemetry tracer provider whose spans go through this
    /// pipeline's queue, with the resource and sampler of the settings, so
    /// that handler code can use the OpenTelemetry API
    /// (`opentelemetry::trace::TracerProvider::tracer`).
    pub fn provider(&self) -> &SdkTracerProvider {
        &self.provider
    }

    fn close(&mut self, grace: Duration, done: Option<oneshot::Sender<()>>) {
        if self.thread.take().is_none() {
            return;
        }
        self.pipeline.open.store(false, Ordering::Relaxed);
        uninstall(&self.pipeline);
        // Its processor only forwards to the queue: nothing to wait for.
        let _ = self.provider.shutdown_with_timeout(Duration::ZERO);
        let _ = self
            .pipeline
            .control
            .send(Control::Shutdown { grace, done });
    }
}

impl Drop for Tracing {
    fn drop(&mut self) {
        self.close(self.timeout, None);
    }
}

/// Whether a pipeline is installed: one relaxed load, for the request path.
#[allow(dead_code, reason = "the span side's hooks call it")]
pub(crate) fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Queues `span` for export if it is sampled and a pipeline is installed.
/// Never blocks and never allocates: the span moves into a slot of the
/// queue, or, when the queue is full, is dropped and counted
/// (`otel_spans_dropped_total{reason="queue_full"}`).
#[allow(dead_code, reason = "the span side's hooks call it")]
pub(crate) fn record(span: SpanData) {
    if !span.span_context.is_sampled() {
        return;
    }
    let current = CURRENT.read().unwrap_or_else(PoisonError::into_inner);
    if let Some(pipeline) = current.as_ref() {
        pipeline.enqueue(span);
    }
}

/// Makes `pipeline` the current one, in place of any other.
fn install(pipeline: Arc<Pipeline>) {
    let mut current = CURRENT.write().unwrap_or_else(PoisonError::into_inner);
    ENABLED.store(true, Ordering::Relaxed);
    *current = Some(pipeline);
}

/// Uninstalls `pipeline` if it is the current one. Once this returns, no
/// [`record`] call is still sending to it (the write lock waits for them).
fn uninstall(pipeline: &Arc<Pipeline>) {
    let mut current = CURRENT.write().unwrap_or_else(PoisonError::into_inner);
    if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, pipeline)) {
        ENABLED.store(false, Ordering::Relaxed);
        *current = None;
    }
}

/// The resource: the chassis' defaults, then `OTEL_RESOURCE_ATTRIBUTES`,
/// then `OTEL_SERVICE_NAME`, each overriding the one before; plus the
/// SDK's `telemetry.sdk.*`. Built without the SDK's detectors, which
/// would read the process environment behind the settings' back.
fn resource(settings: &TraceSettings, info: ResourceInfo) -> Resource {
    let mut attributes: BTreeMap<String, String> = BTreeMap::new();
    attributes.insert("service.name".to_owned(), info.service_name);
    for (key, value) in [
        ("service.version", info.service_version),
        ("service.instance.id", info.instance_id),
    ] {
        if !value.is_empty() {
            attributes.insert(key.to_owned(), value);
        }
    }
    for (key, value) in settings.resource_attributes() {
        attributes.insert(key.clone(), value.clone());
    }
    if let Some(name) = settings.service_name() {
        attributes.insert("service.name".to_owned(), name.to_owned());
    }
    Resource::builder_empty()
        .with_detector(Box::new(TelemetryResourceDetector))
        .with_attributes(attributes.into_iter().map(|(k, v)| KeyValue::new(k, v)))
        .build()
}

// === impl Pipeline ===

impl fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipeline")
            .field("batch", &self.batch)
            .field("open", &self.open.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Pipeline {
    fn enqueue(&self, span: SpanData) {
        if !span.span_context.is_sampled() || !self.open.load(Ordering::Relaxed) {
            return;
        }
        match self.queue.try_send(span) {
            Ok(()) => {
                // One wake-up per batch, not per span: the thread is
                // otherwise woken by its schedule.
                let n = self.queued.fetch_add(1, Ordering::Relaxed);
                if n % self.batch == self.batch - 1 {
                    self.wake.notify_one();
                }
            }
            Err(TrySendError::Full(_)) => {
                self.counters.queue_full.increment(1);
                self.full_drops.fetch_add(1, Ordering::Relaxed);
            }
            // The thread ended while the pipeline was open: it panicked, and
            // its spans are lost as an export's are.
            Err(TrySendError::Disconnected(_)) => self.counters.export_failed.increment(1),
        }
    }
}

// === impl Counters ===

impl Counters {
    fn new() -> Self {
        metrics::describe_counter!(SPANS_EXPORTED, "Spans accepted by the OTLP collector.");
        metrics::describe_counter!(
            SPANS_DROPPED,
            "Spans that never reached the OTLP collector, by reason."
        );
        metrics::describe_counter!(
            EXPORT_FAILURES,
            "Span export requests to the OTLP collector that failed."
        );
        let service = crate::metrics::service_label();
        let dropped = |reason: &'static str| metrics::counter!(SPANS_DROPPED, "service" => service.clone(), "reason" => reason);
        Self {
            exported: metrics::counter!(SPANS_EXPORTED, "service" => service.clone()),
            queue_full: dropped("queue_full"),
            export_failed: dropped("export_failed"),
            shutdown: dropped("shutdown"),
            failures: metrics::counter!(EXPORT_FAILURES, "service" => service.clone()),
        }
    }
}

// === impl QueueProcessor ===

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        self.0.enqueue(span);
    }

    /// Asks the export thread to send everything queued now, without
    /// waiting for it: this runs where a span's code runs, which must not
    /// wait for a collector.
    fn force_flush(&self) -> OTelSdkResult {
        self.0.flush.store(true, Ordering::Relaxed);
        self.0.wake.notify_one();
        Ok(())
    }

    /// Nothing to do: the pipeline is shut down by [`Tracing`].
    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

// === impl OtlpHttpClient ===

impl fmt::Debug for OtlpHttpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OtlpHttpClient")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl OtlpHttpClient {
    fn new(timeout: Duration, last_error: Arc<Mutex<Option<String>>>) -> Self {
        #[cfg(feature = "tls")]
        let connector = crate::tls::ClientTls::global().connector(Some(timeout));
        #[cfg(not(feature = "tls"))]
        let connector = {
            let mut tcp = HttpConnector::new();
            tcp.set_nodelay(true);
            tcp.set_connect_timeout(Some(timeout));
            tcp
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(1)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        Self {
            client,
            timeout,
            last_error,
        }
    }

    async fn send(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let response = self
            .client
            .request(request.map(Full::new))
            .await
            .map_err(|e| error_chain(&e))?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| -> HttpError {
                if e.is::<http_body_util::LengthLimitError>() {
                    Box::new(ResponseBodyTooLarge::new())
                } else {
                    format!("reading the answer: {e}").into()
                }
            })?
            .to_bytes();
        Ok(Response::from_parts(parts, body))
    }
}

#[async_trait::async_trait]
impl HttpClient for OtlpHttpClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let result = match tokio::time::timeout(self.timeout, self.send(request)).await {
            Ok(result) => result,
            Err(_) => Err(format!("no answer within {} ms", self.timeout.as_millis()).into()),
        };
        if let Err(e) = &result {
            *self
                .last_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(e.to_string());
        }
        result
    }
}

/// The grace and the reply of a shutdown message (`None`: every sender
/// is gone).
fn shutdown_of(
    message: Option<Control>,
    fallback: Duration,
) -> (Duration, Option<oneshot::Sender<()>>) {
    match message {
        Some(Control::Shutdown { grace, done }) => (grace, done),
        None => (fallback, None),
    }
}

/// `grace` from now; a year at most, so that no grace overflows the clock.
fn deadline_after(grace: Duration) -> Instant {
    Instant::now() + grace.min(Duration::from_secs(365 * 24 * 3600))
}

/// An error and its sources, `: `-separated.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> HttpError {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !message.ends_with(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = s.source();
    }
    message.into()
}

// === impl Worker ===

impl Worker {
    async fn run(mut self, mut control: mpsc::UnboundedReceiver<Control>) {
        let pipeline = self.pipeline.clone();
        // The grace if every handle went away without a word; it cannot,
        // while `pipeline` holds the sender.
        let fallback = self.timeout;
        let mut schedule = tokio::time::interval_at(Instant::now() + self.delay, self.delay);
        schedule.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (deadline, grace, done) = loop {
            let work = tokio::select! {
                biased;
                message = control.recv() => {
                    let (grace, done) = shutdown_of(message, fallback);
                    break (deadline_after(grace), grace, done);
                }
                () = pipeline.wake.notified() => {
                    if pipeline.flush.swap(false, Ordering::Relaxed) {
                        Work::Everything
                    } else {
                        Work::FullBatches
                    }
                }
                _ = schedule.tick() => Work::Scheduled,
            };
            let job = self.work(work);
            tokio::pin!(job);
            let message = tokio::select! {
                biased;
                () = &mut job => continue,
                message = control.recv() => message,
            };
            // A shutdown while exporting: the export in flight has the
            // grace too, and what it does not finish is counted below.
            let (grace, done) = shutdown_of(message, fallback);
            let deadline = deadline_after(grace);
            let _ = tokio::time::timeout_at(deadline, job).await;
            break (deadline, grace, done);
        };
        self.finish(deadline, grace).await;
        if let Some(done) = done {
            let _ = done.send(());
        }
    }

    async fn work(&mut self, work: Work) {
        match work {
            Work::FullBatches => self.export_full_batches().await,
            Work::Everything => self.export_queued().await,
            Work::Scheduled => {
                self.export_queued().await;
                self.log_full_queue();
            }
        }
    }

    /// Exports every full batch in the queue; a partial one waits.
    async fn export_full_batches(&mut self) {
        for _ in 0..self.capacity {
            let Ok(span) = self.queue.try_recv() else {
                return;
            };
            self.batch.push(span);
            if self.batch.len() >= self.batch_size {
                self.export_batch().await;
            }
        }
    }

    /// Exports everything queued, in batches, the last one partial; at most
    /// a queue's worth, so that a steady stream cannot keep it here.
    async fn export_queued(&mut self) {
        self.export_full_batches().await;
        if !self.batch.is_empty() {
            self.export_batch().await;
        }
    }

    async fn export_batch(&mut self) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        let spans = std::mem::replace(&mut self.batch, Vec::with_capacity(self.batch_size));
        let n = spans.len() as u64;
        self.in_flight = spans.len();
        let result = self.exporter.export(spans).await;
        self.in_flight = 0;
        let counters = &self.pipeline.counters;
        match result {
            Ok(()) => {
                counters.exported.increment(n);
                if std::mem::take(&mut self.failing) {
                    tracing::info!("trace export works again");
                }
            }
            Err(e) => {
                counters.failures.increment(1);
                counters.export_failed.increment(n);
                if !std::mem::replace(&mut self.failing, true) {
                    let cause = self
                        .last_error
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .take();
                    tracing::warn!(
                        error = %e,
                        cause = cause.as_deref().unwrap_or("none"),
                        spans = n,
                        "trace export failed; spans are dropped until it works again"
                    );
                }
            }
        }
    }

    /// Sends what is left within `grace`; counts what is not sent.
    async fn finish(&mut self, deadline: Instant, grace: Duration) {
        // An export cut short by the grace lost its spans with it.
        let mut left = std::mem::take(&mut self.in_flight);
        let drained = Instant::now() < deadline
            && tokio::time::timeout_at(deadline, async {
                // The pipeline no longer takes spans: the queue only shrinks.
                while !self.batch.is_empty() || self.queue_has_spans() {
                    self.export_queued().await;
                }
            })
            .await
            .is_ok();
        if !drained {
            left += self.in_flight + self.batch.len() + self.queue.try_iter().count();
            self.in_flight = 0;
            self.batch.clear();
        }
        if left > 0 {
            self.pipeline.counters.shutdown.increment(left as u64);
            tracing::warn!(
                spans = left,
                grace_ms = grace.as_millis(),
                "trace export did not finish within the shutdown grace; spans dropped"
            );
        }
        let _ = self.exporter.shutdown();
    }

    fn queue_has_spans(&mut self) -> bool {
        match self.queue.try_recv() {
            Ok(span) => {
                self.batch.push(span);
                true
            }
            Err(_) => false,
        }
    }

    /// Logs drops for a full queue as their count doubles: the first, the
    /// second, the fourth, …, not one line per span.
    fn log_full_queue(&mut self) {
        let total = self.pipeline.full_drops.load(Ordering::Relaxed);
        if total > self.logged_full && total >= self.logged_full.saturating_mul(2) {
            tracing::warn!(
                dropped_total = total,
                "trace export queue full; spans dropped"
            );
            self.logged_full = total;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use opentelemetry::{
        InstrumentationScope,
        trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState},
    };

    use super::*;

    fn span(sampled: bool) -> SpanData {
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        SpanData {
            span_context: SpanContext::new(
                TraceId::from(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736),
                SpanId::from(0x00f0_67aa_0ba9_02b7),
                flags,
                false,
                TraceState::NONE,
            ),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: "unit".into(),
            start_time: SystemTime::now(),
            end_time: SystemTime::now(),
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status: Status::Unset,
            instrumentation_scope: InstrumentationScope::builder("unit").build(),
        }
    }

    /// A pipeline whose queue nobody reads: what a stuck export thread
    /// would leave behind.
    fn pipeline(capacity: usize) -> (Arc<Pipeline>, Receiver<SpanData>) {
        let (queue, receiver) = std::sync::mpsc::sync_channel(capacity);
        let (control, _) = mpsc::unbounded_channel();
        let pipeline = Arc::new(Pipeline {
            queue,
            open: AtomicBool::new(true),
            queued: AtomicUsize::new(0),
            batch: capacity,
            wake: Notify::new(),
            flush: AtomicBool::new(false),
            full_drops: AtomicU64::new(0),
            control,
            counters: Counters::new(),
        });
        (pipeline, receiver)
    }

    fn queue_full(recorder: &metrics_util::debugging::Snapshotter) -> u64 {
        recorder
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(k, ..)| {
                k.key().name() == SPANS_DROPPED
                    && k.key()
                        .labels()
                        .any(|l| l.key() == "reason" && l.value() == "queue_full")
            })
            .map(|(.., v)| match v {
                DebugValue::Counter(n) => n,
                _ => 0,
            })
            .sum()
    }

    /// `CURRENT` is the process's: the tests that install a pipeline take
    /// this first.
    static SERIAL: Mutex<()> = Mutex::new(());

    #[test]
    fn record_queues_sampled_spans_and_drops_when_full_without_waiting() {
        let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let (p, receiver) = metrics::with_local_recorder(&recorder, || pipeline(2));

        assert!(!enabled());
        record(span(true));
        assert!(
            receiver.try_recv().is_err(),
            "nothing installed, nothing queued"
        );

        install(p.clone());
        assert!(enabled());
        record(span(false));
        assert!(
            receiver.try_recv().is_err(),
            "unsampled spans are not queued"
        );

        // Nobody reads the queue: the third and later spans are dropped,
        // counted, and every call returns.
        for _ in 0..5 {
            record(span(true));
        }
        assert_eq!(receiver.try_iter().count(), 2);
        assert_eq!(queue_full(&snapshotter), 3);
        assert_eq!(p.full_drops.load(Ordering::Relaxed), 3);

        // The provider's processor goes through the same queue.
        QueueProcessor(p.clone()).on_end(span(true));
        assert_eq!(receiver.try_iter().count(), 1);

        // A later pipeline replaces it; uninstalling the earlier one then
        // leaves the later one in place.
        let (later, later_receiver) = metrics::with_local_recorder(&recorder, || pipeline(2));
        install(later.clone());
        uninstall(&p);
        assert!(enabled());
        record(span(true));
        assert_eq!(later_receiver.try_iter().count(), 1);
        assert!(receiver.try_recv().is_err());
        uninstall(&later);

        assert!(!enabled());
        record(span(true));
        assert!(receiver.try_recv().is_err(), "uninstalled: a no-op");
        assert_eq!(queue_full(&snapshotter), 0, "and not counted");

        // A closed pipeline takes nothing from its provider either.
        p.open.store(false, Ordering::Relaxed);
        QueueProcessor(p).on_end(span(true));
        assert!(receiver.try_recv().is_err());
    }

    /// Without `tls`, the client is plain hyper-util over TCP. (With it,
    /// `tests/otel_export.rs` exports over both.)
    #[cfg(not(feature = "tls"))]
    #[test]
    fn exports_over_plain_http_without_tls() {
        use axum::{Router, routing::post};

        let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let bodies = Arc::new(Mutex::new(Vec::<usize>::new()));
            let seen = bodies.clone();
            let app = Router::new().route(
                "/v1/traces",
                post(move |body: Bytes| async move {
                    seen.lock().unwrap().push(body.len());
                    // An empty ExportTraceServiceResponse encodes to nothing.
                    ([(http::header::CONTENT_TYPE, "application/x-protobuf")], "")
                }),
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let endpoint = format!("http://{}", listener.local_addr().unwrap());
            tokio::spawn(async move { axum::serve(listener, app).await });

            let env = crate::env::Env::from_pairs([("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)]);
            let mut r = crate::env::Reader::new(&env);
            let settings = TraceSettings::read(&mut r);
            r.finish().unwrap();
            let recorder = DebuggingRecorder::new();
            let snapshotter = recorder.snapshotter();
            let info = ResourceInfo {
                service_name: "plain".to_owned(),
                service_version: String::new(),
                instance_id: String::new(),
            };
            let tracing =
                metrics::with_local_recorder(&recorder, || Tracing::start(&settings, info))
                    .unwrap();
            assert!(enabled());
            record(span(true));
            record(span(true));
            tracing.shutdown(Duration::from_secs(30)).await;
            assert!(!enabled());

            let bodies = bodies.lock().unwrap().clone();
            assert_eq!(bodies.len(), 1, "one batch");
            assert!(bodies[0] > 0);
            let exported: u64 = snapshotter
                .snapshot()
                .into_vec()
                .into_iter()
                .filter(|(k, ..)| k.key().name() == SPANS_EXPORTED)
                .map(|(.., v)| match v {
                    DebugValue::Counter(n) => n,
                    _ => 0,
                })
                .sum();
            assert_eq!(exported, 2);
        });
    }
}
