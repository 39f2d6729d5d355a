//! The service builder's stack and the same stack composed by hand from the
//! public layers answer a table of requests alike: the same statuses,
//! problem bodies and headers, the same log lines, audit events and metrics.
//! The builder composes the steps itself (in fewer futures); this is what
//! keeps the two from drifting apart.

mod support;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use axum::{Router, body::Body};
use chassis::{
    Config, ServiceBuilder,
    api::{self, Api},
    audit::{AuditLayer, Auditor},
    correlation::SetCorrelationIdLayer,
    metrics::HttpMetrics,
    problem::EnsureProblemLayer,
    protect::{BodyLimitLayer, LoadShedLayer, RequestTimeoutLayer},
    telemetry::ObserveLayer,
    testing::TestIssuer,
};
use http::{Method, Request, header};
use http_body_util::BodyExt;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use serde_json::Value;
use support::Events;
use tokio::sync::Notify;
use tower::ServiceExt;

const NAME: &str = "equiv";
const PREFIX: &str = "/equiv/v1";
const ISSUER: &str = "https://issuer.test";
const ACCOUNT_READ: &str = "equiv:{account}:read:thing";

fn config() -> Config {
    let mut c = Config::default();
    c.request_timeout = Duration::from_secs(1);
    c.max_body_bytes = 16;
    c.max_concurrent_requests = 1;
    c
}

/// The routes both stacks serve; `/hold` waits for `hold`, to keep one
/// request in flight while another is shed.
fn api(hold: Arc<Notify>) -> Api {
    Api::new()
        .route(
            api::get("/items/{id}", || async { "item" })
                .public()
                .undocumented("a test route"),
        )
        .route(
            api::post("/items", |body: bytes::Bytes| async move { body })
                .public()
                .undocumented("a test route"),
        )
        .route(
            api::get("/slow", || async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                "late"
            })
            .public()
            .undocumented("a test route"),
        )
        .route(
            api::get("/panic", || async {
                if true {
                    panic!("password=hunter2");
                }
                "unreachable"
            })
            .public()
            .undocumented("a test route"),
        )
        .route(
            api::get("/hold", move || {
                let hold = hold.clone();
                async move {
                    hold.notified().await;
                    "released"
                }
            })
            .public()
            .undocumented("a test route"),
        )
        .route(
            api::get(
                "/accounts/{account}/things",
                |p: chassis::auth::Principal| async move { p.subject().to_owned() },
            )
            .requires(ACCOUNT_READ)
            .undocumented("a test route"),
        )
}

/// The builder's stack.
fn built(issuer: &TestIssuer, events: Events, hold: Arc<Notify>) -> (Router, Auditor) {
    let svc = ServiceBuilder::new(NAME, 1)
        .api(api(hold))
        .verifier(issuer.verifier())
        .audit_sink(events)
        .config(config())
        .build()
        .unwrap();
    (svc.router(), svc.auditor().clone())
}

/// The same stack from the public layers, in the order the builder documents.
fn by_hand(issuer: &TestIssuer, events: Events, hold: Arc<Notify>) -> (Router, Auditor) {
    let c = config();
    let auditor = Auditor::new(NAME, events, c.audit_queue);
    let verifier = issuer.verifier();
    let app = api(hold)
        .into_router(PREFIX, Some(&verifier))
        .unwrap()
        // On the matched routes only: an unmatched path gets the front
        // steps alone, as in the builder, and axum's bare 404, which the
        // problem step rewrites.
        .route_layer(
            tower::ServiceBuilder::new()
                .layer(AuditLayer::new(auditor.clone()).api_version(1))
                .layer(LoadShedLayer::new(c.max_concurrent_requests))
                .layer(BodyLimitLayer::new(c.max_body_bytes))
                .layer(RequestTimeoutLayer::new(c.request_timeout)),
        )
        .layer(
            tower::ServiceBuilder::new()
                .layer(SetCorrelationIdLayer::new())
                .layer(EnsureProblemLayer::new())
                .layer(ObserveLayer::new(HttpMetrics::new(NAME))),
        );
    (app, auditor)
}

/// What one stack did with the table.
#[derive(Debug, PartialEq)]
struct Outcome {
    answers: Vec<Value>,
    log: Vec<Value>,
    audit: Vec<Value>,
    metrics: BTreeMap<String, String>,
}

fn request(
    i: usize,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: &'static [u8],
) -> Request<Body> {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("{PREFIX}{path}"))
        .header("x-correlation-id", format!("equiv-{i}"))
        .header(
            "traceparent",
            format!("00-4bf92f3577b34da6a3ce929d0e0e{i:04x}-00f067aa0ba902b7-01"),
        );
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    if !body.is_empty() {
        req = req.header(header::CONTENT_LENGTH, body.len());
    }
    req.body(Body::from(body)).unwrap()
}

/// The parts of a response a client can see, minus the `date`.
async fn answer(res: axum::response::Response) -> Value {
    let status = res.status().as_u16();
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in res.headers() {
        if name != header::DATE {
            headers.insert(name.to_string(), value.to_str().unwrap().to_owned());
        }
    }
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice::<Value>(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    serde_json::json!({ "status": status, "headers": headers, "body": body })
}

/// Builds a stack with `make` and runs the table through it, on this
/// thread's log and metrics.
async fn run(
    issuer: &TestIssuer,
    make: fn(&TestIssuer, Events, Arc<Notify>) -> (Router, Auditor),
) -> Outcome {
    let (logs, _log) = support::Logs::capture(NAME);
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _metrics = metrics::set_default_local_recorder(&recorder);
    let events = Events::default();
    let hold = Arc::new(Notify::new());
    let (app, auditor) = make(issuer, events.clone(), hold.clone());

    let granted = issuer.user_token("ann", &["equiv:67000001:read:thing"]);
    let other = issuer.user_token("bob", &["equiv:67000002:read:thing"]);
    let table: Vec<(Method, &str, Option<&str>, &'static [u8])> = vec![
        (Method::GET, "/items/7", None, b""),
        (Method::GET, "/nowhere", None, b""),
        (Method::DELETE, "/items/7", None, b""),
        (Method::GET, "/accounts/67000001/things", None, b""),
        (
            Method::GET,
            "/accounts/67000001/things",
            Some("not-a-token"),
            b"",
        ),
        (Method::GET, "/accounts/67000001/things", Some(&other), b""),
        (
            Method::GET,
            "/accounts/67000001/things",
            Some(&granted),
            b"",
        ),
        (
            Method::GET,
            "/accounts/not%20valid/things",
            Some(&granted),
            b"",
        ),
        (Method::POST, "/items", None, b"small"),
        (Method::POST, "/items", None, b"far more than sixteen bytes"),
        (Method::GET, "/slow", None, b""),
        (Method::GET, "/panic", None, b""),
    ];
    let mut answers = Vec::new();
    for (i, (method, path, token, body)) in table.into_iter().enumerate() {
        let res = app
            .clone()
            .oneshot(request(i, method, path, token, body))
            .await
            .unwrap();
        answers.push(answer(res).await);
    }
    // Shed: one request held in flight, the next refused.
    let held = tokio::spawn(
        app.clone()
            .oneshot(request(100, Method::GET, "/hold", None, b"")),
    );
    // Let the held request reach its handler.
    for _ in 0..64 {
        tokio::task::yield_now().await;
    }
    let res = app
        .clone()
        .oneshot(request(101, Method::GET, "/items/8", None, b""))
        .await
        .unwrap();
    answers.push(answer(res).await);
    hold.notify_one();
    answers.push(answer(held.await.unwrap().unwrap()).await);

    auditor.flush();
    let log = logs
        .lines()
        .iter()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            // Clock readings differ between runs; everything else must not.
            o.remove("time");
            o.remove("latency_us");
            drawn_span_id(o);
            if let Some(Value::String(loc)) = o.get_mut("location") {
                *loc = loc.split(':').next().unwrap_or_default().to_owned();
            }
            v
        })
        .collect();
    let metrics = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let value = match value {
                DebugValue::Counter(n) => format!("counter {n}"),
                DebugValue::Gauge(g) => format!("gauge {}", g.into_inner()),
                DebugValue::Histogram(h) => format!("histogram of {}", h.len()),
            };
            (format!("{:?}", key.key()), value)
        })
        .collect();
    Outcome {
        answers,
        log,
        audit: audited(&events),
        metrics,
    }
}

/// Takes out the server span's id, which is drawn per request (different
/// each run), after checking it is 16 hex digits beside a trace id.
fn drawn_span_id(o: &mut serde_json::Map<String, Value>) {
    if let Some(span_id) = o.remove("span_id") {
        let span_id = span_id.as_str().unwrap_or_default().to_owned();
        assert!(
            span_id.len() == 16 && span_id.bytes().all(|b| b.is_ascii_hexdigit()),
            "span_id {span_id}"
        );
        assert!(
            o.contains_key("trace_id"),
            "span_id without trace_id: {o:?}"
        );
    }
}

fn audited(events: &Events) -> Vec<Value> {
    events
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|e| {
            let mut v = serde_json::to_value(e).unwrap();
            let o = v.as_object_mut().unwrap();
            o.remove("time");
            o.remove("latency_ms");
            drawn_span_id(o);
            v
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn the_builder_and_the_public_layers_answer_alike() {
    let issuer = TestIssuer::with(ISSUER, NAME);

    let builder = run(&issuer, built).await;
    let public = run(&issuer, by_hand).await;

    // The table exercised what it is meant to.
    let statuses: Vec<u64> = builder
        .answers
        .iter()
        .map(|a| a["status"].as_u64().unwrap())
        .collect();
    assert_eq!(
        statuses,
        [
            200, 404, 405, 401, 401, 403, 200, 404, 200, 413, 504, 500, 503, 200
        ],
        "{:#?}",
        builder.answers
    );
    assert_eq!(builder.audit.len(), 13, "{:#?}", builder.audit);
    assert!(!builder.log.is_empty());
    assert!(!builder.metrics.is_empty());

    for (i, (b, p)) in builder.answers.iter().zip(&public.answers).enumerate() {
        assert_eq!(b, p, "answer {i}");
    }
    assert_eq!(builder.answers.len(), public.answers.len());
    for (i, (b, p)) in builder.log.iter().zip(&public.log).enumerate() {
        assert_eq!(b, p, "log line {i}");
    }
    assert_eq!(builder.log, public.log, "log lines");
    assert_eq!(builder.audit, public.audit, "audit events");
    assert_eq!(builder.metrics, public.metrics, "metrics");
}
