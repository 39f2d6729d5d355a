//! What the chassis core stack costs per request, in-process (no sockets).
//!
//! Group `core_stack` serves the same trivial handler
//! (`GET /hello/v1/items/{id}` answering `{"id":42}`) twice: as a bare axum
//! router, and through the full chassis stack built by
//! [`chassis::ServiceBuilder`] with the route declared public (correlation id,
//! problem+json, request span, RED metrics, access log, audit, load shedding,
//! body limit, timeout, the route guard, panic catcher). Both are driven with `tower::ServiceExt::oneshot` on a clone of
//! the router, on a current-thread tokio runtime, and both collect the
//! response body. The chassis' log is installed first as a service installs
//! it ([`chassis::telemetry::init_with_writer`], writing to `std::io::sink`),
//! so every chassis request writes its access-log line exactly as in
//! production, minus the write to stdout. A
//! third function, `chassis_overhead_paired`, alternates batches of the two
//! and reports only the difference, which holds up better than subtracting two
//! separate figures when other work shares the machine.
//!
//! Group `layers` measures the pieces: id generation, `traceparent` parsing,
//! formatting one JSON event, a request span with its access-log event, the
//! bare router with each chassis layer added on its own, both routers with
//! their routes built once (as `axum::serve` does per connection), and the
//! chassis stack with no subscriber at all.
//!
//! Run with `cargo bench -p service-chassis --bench core_stack`; results are recorded
//! in `docs/benchmarks.md`.

use std::{
    hint::black_box,
    io::Write,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Json, Router,
    body::Body,
    extract::{DefaultBodyLimit, Path},
    routing::get,
};
use chassis::{
    api::{self, Api},
    audit::{AuditLayer, Auditor, LogSink},
    correlation::{CorrelationId, SetCorrelationIdLayer, TraceContext},
    metrics::HttpMetrics,
    problem::EnsureProblemLayer,
    protect::{BodyLimitLayer, CatchPanicLayer, LoadShedLayer, RequestTimeoutLayer},
    telemetry::{ACCESS_TARGET, JsonLayer, ObserveLayer, REQUEST_TARGET},
};
use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Request};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio::runtime::Runtime;
use tower::ServiceExt;
use tracing_subscriber::{filter::Targets, layer::SubscriberExt};

const SERVICE: &str = "hello";
const URI: &str = "/hello/v1/items/42";
const ROUTE: &str = "/hello/v1/items/{id}";
const CORRELATION_ID: &str = "bench-0001";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

async fn item(Path(id): Path<u32>) -> Json<Value> {
    Json(json!({ "id": id }))
}

/// Requests per batch in the paired measurement.
const BATCH: u64 = 64;

/// The request every case serves: the same for bare axum and the chassis.
fn request() -> Request<Body> {
    Request::get(URI)
        .header("x-correlation-id", CORRELATION_ID)
        .body(Body::empty())
        .expect("a valid request")
}

fn bare() -> Router {
    Router::new().route(ROUTE, get(item))
}

fn chassis_core() -> Router {
    chassis::ServiceBuilder::new(SERVICE, 1)
        .api(
            Api::new().route(
                api::get("/items/{id}", item)
                    .public()
                    .undocumented("a test route"),
            ),
        )
        .config(chassis::Config::default())
        .build()
        .expect("the service builds")
        .router()
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// One request through `app`, body included.
async fn serve(app: &Router) -> bytes::Bytes {
    let res = app.clone().oneshot(request()).await.expect("infallible");
    res.into_body().collect().await.expect("a body").to_bytes()
}

/// Serves `iters` requests with each router, alternating batches of
/// [`BATCH`], and returns how much longer the chassis took.
async fn paired(bare: &Router, chassis: &Router, iters: u64) -> Duration {
    let (mut bare_time, mut chassis_time) = (Duration::ZERO, Duration::ZERO);
    let mut left = iters;
    while left > 0 {
        let n = left.min(BATCH);
        let start = tokio::time::Instant::now();
        for _ in 0..n {
            black_box(serve(bare).await);
        }
        bare_time += start.elapsed();
        let start = tokio::time::Instant::now();
        for _ in 0..n {
            black_box(serve(chassis).await);
        }
        chassis_time += start.elapsed();
        left -= n;
    }
    chassis_time.saturating_sub(bare_time)
}

/// A writer that keeps what it is given, for the checks before measuring.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("not poisoned").extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Checks that both routers answer alike and that a chassis request formats
/// exactly one access-log line, so the figures measure what they claim.
fn check(rt: &Runtime, bare: &Router, chassis: &Router) {
    let capture = Capture::default();
    let out = capture.clone();
    let subscriber = tracing_subscriber::registry()
        .with("info".parse::<Targets>().expect("a filter"))
        .with(JsonLayer::new(SERVICE, move || out.clone()));
    tracing::subscriber::with_default(subscriber, || {
        rt.block_on(async {
            assert_eq!(serve(bare).await, r#"{"id":42}"#);
            let res = chassis
                .clone()
                .oneshot(request())
                .await
                .expect("infallible");
            assert_eq!(res.status(), 200);
            assert_eq!(res.headers()["x-correlation-id"], CORRELATION_ID);
            let body = res.into_body().collect().await.expect("a body").to_bytes();
            assert_eq!(body, r#"{"id":42}"#);
        });
    });
    let text = String::from_utf8(capture.0.lock().expect("not poisoned").clone()).expect("UTF-8");
    let access: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(r#""target":"chassis::access""#))
        .collect();
    assert_eq!(access.len(), 1, "one access-log line per request:\n{text}");
    assert!(access[0].contains(CORRELATION_ID), "{}", access[0]);
    assert!(access[0].contains(ROUTE), "{}", access[0]);
}

/// The log the chassis cases run under: the service's own, to a sink.
fn install_subscriber() {
    static TELEMETRY: std::sync::OnceLock<chassis::telemetry::Telemetry> =
        std::sync::OnceLock::new();
    TELEMETRY.get_or_init(|| {
        chassis::telemetry::init_with_writer(SERVICE, &chassis::Config::default(), std::io::sink())
    });
}

fn core_stack(c: &mut Criterion) {
    let rt = runtime();
    let bare = bare();
    let chassis = chassis_core();
    check(&rt, &bare, &chassis);
    install_subscriber();

    let mut group = c.benchmark_group("core_stack");
    group
        .sample_size(50)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(5));
    group.bench_function("bare_axum", |b| b.to_async(&rt).iter(|| serve(&bare)));
    group.bench_function("chassis_core", |b| b.to_async(&rt).iter(|| serve(&chassis)));
    group.bench_function("chassis_overhead_paired", |b| {
        b.to_async(&rt)
            .iter_custom(|iters| paired(&bare, &chassis, iters));
    });
    group.finish();
    chassis::metrics::install_recorder().run_upkeep();
}

fn layers(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("layers");
    group
        .sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));

    group.bench_function("correlation_id_generate", |b| {
        b.iter(CorrelationId::generate)
    });

    let mut headers = HeaderMap::new();
    headers.insert("traceparent", HeaderValue::from_static(TRACEPARENT));
    group.bench_function("trace_context_from_headers", |b| {
        b.iter(|| TraceContext::from_headers(black_box(&headers)));
    });

    // The formatter alone, on a local subscriber, outside any span.
    let local = || {
        tracing_subscriber::registry()
            .with("info".parse::<Targets>().expect("a filter"))
            .with(JsonLayer::new(SERVICE, std::io::sink))
    };
    tracing::subscriber::with_default(local(), || {
        group.bench_function("json_event", |b| {
            b.iter(|| {
                tracing::info!(
                    target: ACCESS_TARGET,
                    method = "GET",
                    route = ROUTE,
                    status = 200_u16,
                    latency_us = black_box(12_u64),
                    "request"
                );
            });
        });
        // What the observe layer does with tracing per request: open the
        // request span with its correlation fields, enter it once (while the
        // inner future is polled), log the access line with the span as its
        // explicit parent, close the span.
        group.bench_function("request_span_and_access_event", |b| {
            b.iter(|| {
                let span = tracing::info_span!(
                    target: REQUEST_TARGET,
                    "request",
                    method = "GET",
                    route = ROUTE,
                    correlation_id = black_box(CORRELATION_ID),
                    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
                );
                drop(black_box(span.enter()));
                tracing::info!(
                    target: ACCESS_TARGET,
                    parent: &span,
                    method = "GET",
                    route = ROUTE,
                    status = 200_u16,
                    latency_us = black_box(12_u64),
                    "request"
                );
            });
        });
    });

    // The bare router with one chassis layer (or layer set) at a time, as the
    // builder applies them, after a baseline measured alongside them; the
    // global subscriber is still installed.
    let cases: Vec<(&str, Router)> = vec![
        ("bare", bare()),
        ("bare_nested_under_prefix", {
            Router::new().nest("/hello/v1", Router::new().route("/items/{id}", get(item)))
        }),
        (
            "bare_plus_correlation",
            bare().layer(SetCorrelationIdLayer::new()),
        ),
        ("bare_plus_problem", bare().layer(EnsureProblemLayer::new())),
        (
            "bare_plus_observe",
            bare().layer(ObserveLayer::new(HttpMetrics::new(SERVICE))),
        ),
        (
            "bare_plus_audit",
            bare().layer(AuditLayer::new(Auditor::new(
                SERVICE,
                LogSink,
                chassis::Config::default().audit_queue,
            ))),
        ),
        (
            "bare_plus_protect",
            bare().layer(
                tower::ServiceBuilder::new()
                    .layer(LoadShedLayer::new(1024))
                    .layer(BodyLimitLayer::new(1024 * 1024))
                    .layer(DefaultBodyLimit::max(1024 * 1024))
                    .layer(RequestTimeoutLayer::new(Duration::from_secs(30))),
            ),
        ),
        (
            "bare_plus_catch_panic",
            bare().layer(CatchPanicLayer::new()),
        ),
    ];
    for (name, app) in &cases {
        rt.block_on(async { assert_eq!(serve(app).await, r#"{"id":42}"#) });
        group.bench_function(*name, |b| b.to_async(&rt).iter(|| serve(app)));
    }

    // `oneshot` on a `Router` turns each handler into a route on every
    // request; `axum::serve` does it once per connection
    // (`Router::with_state(())`). These two show the per-request cost on a
    // kept-alive connection.
    let connection: Vec<(&str, Router)> = vec![
        ("bare_per_connection", bare().with_state(())),
        ("chassis_core_per_connection", chassis_core().with_state(())),
    ];
    for (name, app) in &connection {
        rt.block_on(async { assert_eq!(serve(app).await, r#"{"id":42}"#) });
        group.bench_function(*name, |b| b.to_async(&rt).iter(|| serve(app)));
    }

    // The whole stack with tracing switched off: what remains is the layers
    // and the metrics.
    let chassis = chassis_core();
    tracing::subscriber::with_default(tracing::subscriber::NoSubscriber::default(), || {
        group.bench_function("chassis_core_no_subscriber", |b| {
            b.to_async(&rt).iter(|| serve(&chassis));
        });
    });
    group.finish();
    chassis::metrics::install_recorder().run_upkeep();
}

criterion_group!(benches, core_stack, layers);
criterion_main!(benches);
