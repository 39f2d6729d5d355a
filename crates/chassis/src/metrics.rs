//! Prometheus metrics: RED per route, process metrics, and the service's own.
//!
//! # The standard
//!
//! Every service exports, at `GET /metrics` on its own listener, the rate,
//! errors and duration (RED) of the requests it serves, labelled by **route
//! template** (`/ticketing/v1/{account}/tickets`), never by raw path: a
//! scanner requesting a million distinct URLs must not create a million
//! series, so every request that matches no route is labelled `unmatched`.
//! Names follow the OpenTelemetry HTTP semantic conventions as Prometheus
//! renders them, so dashboards work for every service alike:
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `http_server_request_duration_seconds` | histogram | `service`, `http_request_method`, `http_route`, `http_response_status_code` |
//! | `http_server_active_requests` | gauge | `service`, `http_request_method` |
//! | `http_server_deprecated_requests_total` | counter | `service`, `api_version`, `http_route` |
//!
//! The version of a call is in its route (`/orders/v1/...`); a call to a
//! [deprecated version](crate::service::ApiVersion) is also counted in
//! `http_server_deprecated_requests_total`, so that "who still calls v1"
//! is one query (`sum by (http_route) (rate(...[1h]))`) and an alert can
//! watch it fall to zero before the sunset. The series exist only for
//! deprecated versions, and the count is a handle resolved when the
//! service is built: the routes of current versions pay nothing. A 404
//! under a deprecated prefix is counted with `http_route="unmatched"`.
//!
//! Methods outside the standard set are labelled `_OTHER` (OpenTelemetry's
//! rule, again against cardinality). Requests that are shed, time out or panic
//! are counted too: the metrics sit outside those layers. The histogram uses
//! OpenTelemetry's recommended HTTP buckets (5 ms to 10 s), with two finer ones
//! below 5 ms because chassis services answer in microseconds when healthy.
//! Process metrics (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_open_fds`,
//! `process_start_time_seconds`, ...) come from the `metrics-process` crate
//! when the `process-metrics` feature is on (the default).
//!
//! # How the chassis does it
//!
//! The chassis records with the [`metrics`] facade; the service builder
//! installs the Prometheus recorder ([`install_recorder`]) so a service's own
//! `metrics::counter!(...)` calls land in the same output. Handles are
//! resolved once per (route, method, status) and cached in [`HttpMetrics`], so
//! a request records with a few atomic operations and no allocation.
//! Parts that count on their own (circuit breakers, bulkheads) register a
//! refresher ([`register_refresher`]) that [`render`] runs to copy their
//! counts into their series, so that their calls pay no metric update; this
//! module knows nothing of them.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let handle = chassis::metrics::install_recorder();
//! metrics::counter!("orders_placed_total", "service" => "orders").increment(1);
//! assert!(handle.render().contains("orders_placed_total{service=\"orders\"} 1"));
//! # }
//! ```

use std::{
    collections::HashMap,
    hash::{BuildHasher, BuildHasherDefault, Hasher},
    sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock},
    time::Duration,
};

use axum::extract::MatchedPath;
use http::Method;
use metrics::{Gauge, Histogram, Label, SharedString};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Name of the server request duration histogram.
pub const HTTP_SERVER_REQUEST_DURATION: &str = "http_server_request_duration_seconds";
/// Name of the server in-flight requests gauge.
pub const HTTP_SERVER_ACTIVE_REQUESTS: &str = "http_server_active_requests";
/// Name of the counter of requests to a deprecated API version, labelled
/// `service`, `api_version` and `http_route` (see
/// [`ApiVersion`](crate::service::ApiVersion)).
pub const HTTP_SERVER_DEPRECATED_REQUESTS: &str = "http_server_deprecated_requests_total";
/// Name of the client request duration histogram.
pub const HTTP_CLIENT_REQUEST_DURATION: &str = "http_client_request_duration_seconds";
/// Name of the gauge of a downstream's addresses by `state` (`healthy`,
/// `ejected`).
pub const HTTP_CLIENT_ENDPOINTS: &str = "http_client_endpoints";
/// Name of the counter of a downstream's addresses ejected by outlier
/// detection.
pub const HTTP_CLIENT_EJECTIONS: &str = "http_client_ejections_total";
/// The `http_route` label of requests that match no route.
pub const UNMATCHED: &str = "unmatched";

/// Histogram buckets for HTTP durations, in seconds: OpenTelemetry's
/// recommendation, with 1 ms and 2.5 ms added below.
pub const HTTP_DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// How often the recorder's upkeep (draining histogram samples) runs.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder as the global `metrics` recorder, once per
/// process, and returns the handle that renders it. Later calls return the
/// same handle. If another global recorder was installed first, the returned
/// handle renders a registry nothing records into, and a warning is logged.
pub fn install_recorder() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = builder().build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!(
                    "a global metrics recorder was already installed; /metrics will be empty"
                );
            }
            describe();
            handle
        })
        .clone()
}

static SERVICE_LABEL: RwLock<Option<SharedString>> = RwLock::new(None);

/// Sets the `service` label that the resilience metrics (circuit breakers,
/// bulkheads, downstream clients) carry. [`crate::service::ServiceBuilder::new`]
/// sets it; a program that builds breakers before any service sets it first.
pub fn set_service_label(service: &str) {
    let mut label = SERVICE_LABEL
        .write()
        .unwrap_or_else(PoisonError::into_inner);
    *label = Some(SharedString::from(service.to_owned()));
}

/// The `service` label set by [`set_service_label`], empty until then
/// (Prometheus treats an empty label as absent).
pub fn service_label() -> SharedString {
    SERVICE_LABEL
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
        .unwrap_or_else(|| SharedString::const_str(""))
}

/// The Prometheus builder with the chassis' buckets, for services that build
/// their own recorder.
pub fn builder() -> PrometheusBuilder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_duration_seconds".to_owned()),
            HTTP_DURATION_BUCKETS,
        )
        .expect("the bucket list is not empty")
}

fn describe() {
    metrics::describe_histogram!(
        HTTP_SERVER_REQUEST_DURATION,
        metrics::Unit::Seconds,
        "Duration of HTTP server requests."
    );
    metrics::describe_histogram!(
        HTTP_CLIENT_REQUEST_DURATION,
        metrics::Unit::Seconds,
        "Duration of calls to downstream services, retries included."
    );
    metrics::describe_gauge!(
        HTTP_SERVER_ACTIVE_REQUESTS,
        "Number of active HTTP server requests."
    );
    metrics::describe_counter!(
        HTTP_SERVER_DEPRECATED_REQUESTS,
        "Requests to a deprecated API version, by version and route: who still has to move."
    );
    metrics::describe_gauge!(
        HTTP_CLIENT_ENDPOINTS,
        "Addresses of a downstream with several, by state (healthy, ejected)."
    );
    metrics::describe_counter!(
        HTTP_CLIENT_EJECTIONS,
        "Addresses of a downstream ejected after failing in a row."
    );
    #[cfg(feature = "process-metrics")]
    process_collector().describe();
}

#[cfg(feature = "process-metrics")]
fn process_collector() -> &'static metrics_process::Collector {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

/// Series brought up to date at render time, for the rest of the process.
type Refresher = Box<dyn Fn() + Send + Sync>;

static REFRESHERS: Mutex<Vec<Refresher>> = Mutex::new(Vec::new());

/// Registers `refresh` to run at every [`render`] from now on, for the rest
/// of the process, before the output is written.
///
/// This is how a part keeps series that would cost too much to update on
/// every change: it counts in its own atomics and copies them to its
/// `metrics` handles only when someone looks. Circuit breakers and bulkheads
/// register themselves this way; a service may do the same for, say, a
/// queue's depth. Register once per object that lives for the process,
/// never per request: a refresher is never removed.
///
/// Refreshers run one at a time, one render after another, never two at
/// once, so one may compare what it reported last with what it counts now
/// without a read-modify-write. A refresher must not register another.
///
/// # Example
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
///
/// static QUEUED: AtomicU64 = AtomicU64::new(0);
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let handle = chassis::metrics::install_recorder();
/// let depth = metrics::gauge!("mail_queue_depth", "service" => "mail");
/// chassis::metrics::register_refresher(move || depth.set(QUEUED.load(Ordering::Relaxed) as f64));
///
/// QUEUED.store(3, Ordering::Relaxed);
/// let text = chassis::metrics::render(&handle);
/// assert!(text.contains("mail_queue_depth{service=\"mail\"} 3"), "{text}");
/// # }
/// ```
pub fn register_refresher(refresh: impl Fn() + Send + Sync + 'static) {
    refreshers().push(Box::new(refresh));
}

/// Runs every refresher, holding the list throughout so that two renders
/// at once cannot both report the same change.
fn refresh() {
    for refresh in refreshers().iter() {
        refresh();
    }
}

fn refreshers() -> MutexGuard<'static, Vec<Refresher>> {
    REFRESHERS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Renders the metrics in the Prometheus text format, bringing up to date
/// first the process metrics and the series of every
/// [registered refresher](register_refresher) (`bulkhead_in_use`,
/// `circuit_breaker_calls_total`, ...).
pub fn render(handle: &PrometheusHandle) -> String {
    refresh();
    #[cfg(feature = "process-metrics")]
    process_collector().collect();
    handle.render()
}

/// The methods that get their own label value; the rest are `_OTHER`.
const METHODS: [Method; 9] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::CONNECT,
    Method::OPTIONS,
    Method::TRACE,
    Method::PATCH,
];

/// Index of a method into the per-method tables; `METHODS.len()` is `_OTHER`.
pub(crate) fn method_index(method: &Method) -> usize {
    METHODS
        .iter()
        .position(|m| m == method)
        .unwrap_or(METHODS.len())
}

pub(crate) fn method_label_of(index: usize) -> &'static str {
    METHODS.get(index).map_or("_OTHER", Method::as_str)
}

/// Cached metric handles for one service's HTTP server side.
///
/// Cheap to clone (an `Arc`). Handles are registered with the recorder that
/// is current when they are first needed, normally the global one installed
/// by [`install_recorder`].
#[derive(Clone)]
pub struct HttpMetrics {
    inner: Arc<Inner>,
}

struct Inner {
    service: SharedString,
    active: Vec<Gauge>,
    durations: RwLock<HashMap<Key, Entry, BuildHasherDefault<KeyHasher>>>,
    route_hasher: foldhash::fast::FixedState,
}

/// A route is keyed by a hash of its template (so the key holds no borrowed
/// text and costs no allocation); the entry keeps the text to confirm a hit.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    route_hash: u64,
    method: usize,
    status: u16,
}

struct Entry {
    route: Box<str>,
    histogram: Histogram,
}

impl std::fmt::Debug for HttpMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpMetrics")
            .field("service", &self.inner.service)
            .finish_non_exhaustive()
    }
}

impl HttpMetrics {
    /// Handles for `service`.
    pub fn new(service: impl Into<SharedString>) -> Self {
        let service = service.into();
        let active = (0..=METHODS.len())
            .map(|i| {
                metrics::gauge!(
                    HTTP_SERVER_ACTIVE_REQUESTS,
                    "service" => service.clone(),
                    "http_request_method" => method_label_of(i),
                )
            })
            .collect();
        Self {
            inner: Arc::new(Inner {
                service,
                active,
                durations: RwLock::new(HashMap::default()),
                route_hasher: foldhash::fast::FixedState::with_seed(0x5eed),
            }),
        }
    }

    /// The service label.
    pub fn service(&self) -> &str {
        &self.inner.service
    }

    /// The in-flight gauge of a method index.
    pub(crate) fn active(&self, method: usize) -> &Gauge {
        &self.inner.active[method.min(METHODS.len())]
    }

    /// Records one finished request of `route` (`None`: no route matched).
    ///
    /// The last few histograms a thread recorded into are kept with their
    /// route, so steady traffic finds its histogram by comparing a pointer
    /// and two numbers, without hashing the template or taking the shared
    /// map's lock.
    pub(crate) fn record_route(
        &self,
        route: Option<&MatchedPath>,
        method: usize,
        status: u16,
        elapsed: Duration,
    ) {
        let Some(route) = route else {
            return self.record(UNMATCHED, method, status, elapsed);
        };
        let text = route.as_str();
        let slot = ((text.as_ptr() as usize >> 4) ^ usize::from(status) ^ method) % RECENT_SLOTS;
        let hit = RECENT.with_borrow(|recent| match &recent[slot] {
            Some(r)
                if Arc::ptr_eq(&r.metrics, &self.inner)
                    && std::ptr::eq(r.route.as_str(), text)
                    && r.method == method
                    && r.status == status =>
            {
                r.histogram.record(elapsed.as_secs_f64());
                true
            }
            _ => false,
        });
        if hit {
            return;
        }
        let histogram = self.histogram(text, method, status);
        histogram.record(elapsed.as_secs_f64());
        // The entry holds the route (a shared reference to the router's
        // template), so its address cannot be reused while it is cached.
        RECENT.with_borrow_mut(|recent| {
            recent[slot] = Some(Recent {
                metrics: self.inner.clone(),
                route: route.clone(),
                method,
                status,
                histogram,
            });
        });
    }

    /// Records one finished request.
    pub(crate) fn record(&self, route: &str, method: usize, status: u16, elapsed: Duration) {
        self.histogram(route, method, status)
            .record(elapsed.as_secs_f64());
    }

    /// The duration histogram of a route, method and status.
    fn histogram(&self, route: &str, method: usize, status: u16) -> Histogram {
        let key = Key {
            route_hash: self.inner.route_hasher.hash_one(route),
            method,
            status,
        };
        if let Ok(map) = self.inner.durations.read()
            && let Some(entry) = map.get(&key).filter(|e| &*e.route == route)
        {
            return entry.histogram.clone();
        }
        let histogram = metrics::histogram!(
            HTTP_SERVER_REQUEST_DURATION,
            vec![
                Label::new("service", self.inner.service.clone()),
                Label::new("http_request_method", method_label_of(method)),
                Label::new("http_route", route.to_owned()),
                Label::new("http_response_status_code", status.to_string()),
            ]
        );
        if let Ok(mut map) = self.inner.durations.write() {
            map.insert(
                key,
                Entry {
                    route: route.into(),
                    histogram: histogram.clone(),
                },
            );
        }
        histogram
    }
}

/// How many histograms each thread keeps at hand, see
/// [`HttpMetrics::record_route`].
const RECENT_SLOTS: usize = 8;

/// A histogram a thread recorded into, with what it was for.
struct Recent {
    metrics: Arc<Inner>,
    route: MatchedPath,
    method: usize,
    status: u16,
    histogram: Histogram,
}

thread_local! {
    static RECENT: std::cell::RefCell<[Option<Recent>; RECENT_SLOTS]> =
        const { std::cell::RefCell::new([const { None }; RECENT_SLOTS]) };
}

/// Mixes the integer fields of a [`Key`]; the keys are few and well spread.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn write_u16(&mut self, n: u16) {
        self.write_u64(u64::from(n));
    }
}

/// The `MatchedPath` each of `routes` (template, a path it matches) gives
/// its requests, in order: the shared template axum hands out, as the
/// chassis' layers see it.
#[cfg(test)]
pub(crate) async fn matched_paths(routes: &[(&str, &str)]) -> Vec<MatchedPath> {
    use tower::ServiceExt;
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut app = axum::Router::new();
    for (template, _) in routes {
        let seen = seen.clone();
        app = app.route(
            template,
            axum::routing::get(move |m: MatchedPath| async move { seen.lock().unwrap().push(m) }),
        );
    }
    for (_, uri) in routes {
        let req = http::Request::get(*uri)
            .body(axum::body::Body::empty())
            .unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), 200, "{uri}");
    }
    std::mem::take(&mut *seen.lock().unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    #[test]
    fn records_by_template_with_cached_handles() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            let m = HttpMetrics::new("svc");
            let route: &str = "/svc/v1/items/{id}";
            for _ in 0..3 {
                m.record(
                    route,
                    method_index(&Method::GET),
                    200,
                    Duration::from_millis(2),
                );
            }
            m.record(
                route,
                method_index(&Method::from_bytes(b"BREW").unwrap()),
                404,
                Duration::ZERO,
            );
            m.active(0).increment(1.0);
        });
        let snapshot = snapshotter.snapshot().into_vec();
        let mut histograms = snapshot
            .iter()
            .filter(|(k, ..)| k.key().name() == HTTP_SERVER_REQUEST_DURATION)
            .map(|(k, _, _, v)| {
                let labels: Vec<String> = k
                    .key()
                    .labels()
                    .map(|l| format!("{}={}", l.key(), l.value()))
                    .collect();
                let n = match v {
                    DebugValue::Histogram(values) => values.len(),
                    _ => 0,
                };
                (labels.join(","), n)
            })
            .collect::<Vec<_>>();
        histograms.sort();
        assert_eq!(
            histograms,
            [
                (
                    "service=svc,http_request_method=GET,http_route=/svc/v1/items/{id},http_response_status_code=200"
                        .to_owned(),
                    3
                ),
                (
                    "service=svc,http_request_method=_OTHER,http_route=/svc/v1/items/{id},http_response_status_code=404"
                        .to_owned(),
                    1
                ),
            ]
        );
    }

    #[test]
    fn the_same_route_at_new_addresses_is_one_entry() {
        // A router nested in another may hand out a fresh copy of the
        // template on every request; the cache must not grow with them.
        let recorder = DebuggingRecorder::new();
        metrics::with_local_recorder(&recorder, || {
            let m = HttpMetrics::new("svc");
            for _ in 0..100 {
                let copy = String::from("/svc/v1/items/{id}");
                m.record(&copy, 0, 200, Duration::ZERO);
            }
            assert_eq!(m.inner.durations.read().unwrap().len(), 1);
        });
    }

    #[test]
    fn routes_are_told_apart_by_text_not_address() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            let m = HttpMetrics::new("svc");
            let mut buf = String::from("/a/{x}");
            let route = buf.as_str();
            m.record(route, 0, 200, Duration::ZERO);
            buf.replace_range(1..2, "b");
            m.record(buf.as_str(), 0, 200, Duration::ZERO);
        });
        let routes: Vec<String> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter_map(|(k, ..)| {
                k.key()
                    .labels()
                    .find(|l| l.key() == "http_route")
                    .map(|l| l.value().to_owned())
            })
            .collect();
        assert!(routes.contains(&"/a/{x}".to_owned()));
        assert!(routes.contains(&"/b/{x}".to_owned()));
    }

    #[tokio::test]
    async fn each_thread_keeps_recent_histograms_apart_by_route_method_status_and_service() {
        let [a, b] = matched_paths(&[("/a/{x}", "/a/1"), ("/b", "/b")])
            .await
            .try_into()
            .unwrap();
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            let svc = HttpMetrics::new("svc");
            let other = HttpMetrics::new("other");
            let get = method_index(&Method::GET);
            let post = method_index(&Method::POST);
            for _ in 0..3 {
                svc.record_route(Some(&a), get, 200, Duration::ZERO);
                svc.record_route(Some(&a), get, 404, Duration::ZERO);
            }
            svc.record_route(Some(&a), post, 200, Duration::ZERO);
            svc.record_route(Some(&b), get, 200, Duration::ZERO);
            svc.record_route(None, get, 404, Duration::ZERO);
            other.record_route(Some(&a), get, 200, Duration::ZERO);
            svc.record_route(Some(&a), get, 200, Duration::ZERO);
        });
        let mut counts: Vec<(String, usize)> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(k, ..)| k.key().name() == HTTP_SERVER_REQUEST_DURATION)
            .map(|(k, _, _, v)| {
                let labels: Vec<String> = k.key().labels().map(|l| l.value().to_owned()).collect();
                let n = match v {
                    DebugValue::Histogram(values) => values.len(),
                    _ => 0,
                };
                (labels.join(" "), n)
            })
            .collect();
        counts.sort();
        assert_eq!(
            counts,
            [
                ("other GET /a/{x} 200".to_owned(), 1),
                ("svc GET /a/{x} 200".to_owned(), 4),
                ("svc GET /a/{x} 404".to_owned(), 3),
                ("svc GET /b 200".to_owned(), 1),
                ("svc GET unmatched 404".to_owned(), 1),
                ("svc POST /a/{x} 200".to_owned(), 1),
            ]
        );
    }

    /// Answers `GET /metrics` of a service at `addr`, over a real socket.
    async fn scrape(addr: std::net::SocketAddr) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap();
        let raw = String::from_utf8(raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
        body.to_owned()
    }

    /// The value of the one series of `metric` whose labels include all of
    /// `labels`.
    fn value(text: &str, metric: &str, labels: &[&str]) -> Option<f64> {
        let mut found = text.lines().filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with('{'))
                && labels.iter().all(|label| l.contains(label))
        });
        let line = found.next()?;
        assert_eq!(found.next(), None, "{metric} {labels:?} is one series");
        line.rsplit(' ').next()?.parse().ok()
    }

    // Breakers and bulkheads are made after the recorder is installed (a
    // service makes them in its `app()`); the refreshers they register are
    // what brings their counts to `/metrics`.
    #[tokio::test]
    async fn breakers_and_bulkheads_made_after_the_recorder_show_at_the_endpoint() {
        use crate::{bulkhead::Bulkhead, circuit_breaker};
        let service = crate::service::ServiceBuilder::new("late-parts", 1)
            .config(crate::Config::default())
            .build()
            .unwrap();
        let breaker = circuit_breaker::CircuitBreaker::new(
            "late-breaker",
            circuit_breaker::Config::count(10),
        );
        for ok in [true, true, false] {
            let permit = breaker.try_acquire().unwrap();
            if ok {
                permit.success()
            } else {
                permit.failure()
            }
        }
        let bulkhead = Bulkhead::new("late-bulkhead", 2);
        let held = bulkhead.try_acquire().unwrap();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(service.serve_with(listener, async {
            let _ = stopped.await;
        }));

        let breaker_name = "name=\"late-breaker\"";
        let calls = |text: &str, outcome: &str| {
            let outcome = format!("outcome=\"{outcome}\"");
            value(
                text,
                "circuit_breaker_calls_total",
                &[breaker_name, &outcome],
            )
        };
        let in_use = |text: &str| value(text, "bulkhead_in_use", &["name=\"late-bulkhead\""]);
        let text = scrape(addr).await;
        assert_eq!(calls(&text, "success"), Some(2.0), "{text}");
        assert_eq!(calls(&text, "failure"), Some(1.0), "{text}");
        assert_eq!(
            value(&text, "circuit_breaker_state", &[breaker_name]),
            Some(0.0),
            "{text}"
        );
        assert_eq!(in_use(&text), Some(1.0), "{text}");

        // A second render reports what changed since the first, and only that.
        drop(held);
        breaker.try_acquire().unwrap().failure();
        let text = scrape(addr).await;
        assert_eq!(calls(&text, "success"), Some(2.0), "{text}");
        assert_eq!(calls(&text, "failure"), Some(2.0), "{text}");
        assert_eq!(in_use(&text), Some(0.0), "{text}");

        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
