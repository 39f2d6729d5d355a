//! The composed stack, driven without a socket: every chassis error is
//! problem+json with the correlation id, and the layers sit in the order the
//! service builder documents.

mod support;

use std::{sync::Arc, time::Duration};

use axum::{Router, body::Body};
use chassis::api::{self, Api};
use chassis::{Config, ServiceBuilder};
use http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use tokio::sync::Notify;
use tower::ServiceExt;

fn config() -> Config {
    let mut c = Config::default();
    c.request_timeout = Duration::from_secs(1);
    c.max_body_bytes = 16;
    c.max_concurrent_requests = 1;
    c
}

fn service(name: &str, hold: Arc<Notify>) -> chassis::Service {
    let api = Api::new()
        .route(
            api::get("/ok", || async { "ok" })
                .public()
                .undocumented("a test route"),
        )
        .route(
            api::get("/items/{id}", || async { "item" })
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
            api::post("/echo", |body: bytes::Bytes| async move { body })
                .public()
                .undocumented("a test route"),
        )
        .route(
            api::post(
                "/json",
                |axum::Json(v): axum::Json<serde_json::Value>| async move { axum::Json(v) },
            )
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
        );
    ServiceBuilder::new(name, 1)
        .api(api)
        .config(config())
        .build()
        .unwrap()
}

async fn call(
    app: &Router,
    req: Request<Body>,
) -> (StatusCode, http::HeaderMap, serde_json::Value) {
    let res = app.clone().oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (parts.status, parts.headers, json)
}

fn req(method: &str, uri: &str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(uri)
        .header("x-correlation-id", "stack-test")
        .body(Body::empty())
        .unwrap()
}

/// Asserts the answer is a problem document with the request's id.
fn assert_problem(
    status: StatusCode,
    headers: &http::HeaderMap,
    body: &serde_json::Value,
    want: u16,
) {
    assert_eq!(status.as_u16(), want, "{body}");
    assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
    assert_eq!(headers["x-correlation-id"], "stack-test");
    assert_eq!(body["status"], want);
    assert_eq!(body["correlation_id"], "stack-test");
    for member in ["type", "title", "detail"] {
        assert!(body[member].is_string(), "{member} missing: {body}");
    }
}

#[tokio::test]
async fn not_found_and_method_not_allowed() {
    let app = service("stack-a", Arc::new(Notify::new())).router();
    let (s, h, b) = call(&app, req("GET", "/nope")).await;
    assert_problem(s, &h, &b, 404);
    let (s, h, b) = call(&app, req("GET", "/stack-a/v1/nope")).await;
    assert_problem(s, &h, &b, 404);
    let (s, h, b) = call(&app, req("DELETE", "/stack-a/v1/ok")).await;
    assert_problem(s, &h, &b, 405);
    assert_eq!(h[header::ALLOW], "GET,HEAD");
}

#[tokio::test]
async fn body_too_large() {
    let app = service("stack-b", Arc::new(Notify::new())).router();
    let r = Request::post("/stack-b/v1/echo")
        .header("x-correlation-id", "stack-test")
        .header(header::CONTENT_LENGTH, "17")
        .body(Body::from("x".repeat(17)))
        .unwrap();
    let (s, h, b) = call(&app, r).await;
    assert_problem(s, &h, &b, 413);
    let r = Request::post("/stack-b/v1/echo")
        .header("x-correlation-id", "stack-test")
        .body(Body::from("x".repeat(16)))
        .unwrap();
    assert_eq!(call(&app, r).await.0, StatusCode::OK);
}

#[tokio::test]
async fn a_limit_above_axums_default_reaches_the_extractors() {
    // axum's extractors refuse bodies over 2 MiB unless told otherwise;
    // the builder raises their limit to the configured one.
    let mut c = config();
    c.max_body_bytes = 3 * 1024 * 1024;
    let app = ServiceBuilder::new("stack-big", 1)
        .api(
            Api::new().route(
                api::post("/echo", |body: bytes::Bytes| async move {
                    body.len().to_string()
                })
                .public()
                .undocumented("a test route"),
            ),
        )
        .config(c)
        .build()
        .unwrap()
        .router();
    let post = |len: usize, declared: bool| {
        let mut r = Request::post("/stack-big/v1/echo").header("x-correlation-id", "stack-test");
        if declared {
            r = r.header(header::CONTENT_LENGTH, len.to_string());
        }
        // Without a declared length the body is read through the limit.
        r.body(Body::from(vec![b'x'; len])).unwrap()
    };
    let big = 5 * 1024 * 1024 / 2;
    for declared in [true, false] {
        let res = app.clone().oneshot(post(big, declared)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "declared length: {declared}");
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, big.to_string());
        let (s, h, b) = call(&app, post(3 * 1024 * 1024 + 1, declared)).await;
        assert_problem(s, &h, &b, 413);
    }
}

#[tokio::test]
async fn extractor_rejections_become_problems() {
    let app = service("stack-c", Arc::new(Notify::new())).router();
    let r = Request::post("/stack-c/v1/json")
        .header("x-correlation-id", "stack-test")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{oops"))
        .unwrap();
    let (s, h, b) = call(&app, r).await;
    assert_problem(s, &h, &b, 400);
    assert!(b["detail"].as_str().unwrap().contains("JSON"), "{b}");
}

#[tokio::test(start_paused = true)]
async fn timeout_is_504() {
    let app = service("stack-d", Arc::new(Notify::new())).router();
    let (s, h, b) = call(&app, req("GET", "/stack-d/v1/slow")).await;
    assert_problem(s, &h, &b, 504);
}

#[tokio::test]
async fn panic_is_500_without_the_message() {
    let svc = service("stack-e", Arc::new(Notify::new()));
    let app = svc.router();
    let (s, h, b) = call(&app, req("GET", "/stack-e/v1/panic")).await;
    assert_problem(s, &h, &b, 500);
    assert!(!b.to_string().contains("hunter2"));
    // Measured like any 500, under its route.
    let text = svc.prometheus().render();
    assert!(
        text.lines().any(
            |l| l.starts_with("http_server_request_duration_seconds_count")
                && l.contains("service=\"stack-e\"")
                && l.contains("http_route=\"/stack-e/v1/panic\"")
                && l.contains("http_response_status_code=\"500\"")
        ),
        "{text}"
    );
}

#[tokio::test]
async fn shedding_is_fast_503_counted_and_spares_probes() {
    let hold = Arc::new(Notify::new());
    let svc = service("stack-f", hold.clone());
    let app = svc.router();
    let held = tokio::spawn({
        let app = app.clone();
        async move { call(&app, req("GET", "/stack-f/v1/hold")).await }
    });
    // Wait until the held request occupies the only place.
    loop {
        let (s, ..) = call(&app, req("GET", "/stack-f/v1/ok")).await;
        if s == StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        tokio::task::yield_now().await;
    }
    let (s, h, b) = call(&app, req("GET", "/stack-f/v1/ok")).await;
    assert_problem(s, &h, &b, 503);
    assert_eq!(h[header::RETRY_AFTER], "1");
    // Liveness and readiness are never shed.
    assert_eq!(
        call(&app, req("GET", "/health/live")).await.0,
        StatusCode::OK
    );
    assert_eq!(
        call(&app, req("GET", "/health/ready")).await.0,
        StatusCode::OK
    );
    hold.notify_waiters();
    assert_eq!(held.await.unwrap().0, StatusCode::OK);
    // Shed requests are in the metrics: the metrics sit outside shedding.
    let text = svc.prometheus().render();
    assert!(
        text.lines().any(
            |l| l.starts_with("http_server_request_duration_seconds_count")
                && l.contains("service=\"stack-f\"")
                && l.contains("http_route=\"/stack-f/v1/ok\"")
                && l.contains("http_response_status_code=\"503\"")
        ),
        "{text}"
    );
}

#[tokio::test]
async fn scanners_cannot_create_series() {
    let svc = service("stack-g", Arc::new(Notify::new()));
    let app = svc.router();
    for i in 0..50 {
        let (s, ..) = call(&app, req("GET", &format!("/scan/{i}/admin.php"))).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
    }
    assert_eq!(
        call(&app, req("GET", "/stack-g/v1/items/123")).await.0,
        StatusCode::OK
    );
    let text = svc.prometheus().render();
    let ours: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("http_server_request_duration_seconds_count")
                && l.contains("service=\"stack-g\"")
        })
        .collect();
    assert_eq!(ours.len(), 2, "{ours:?}");
    assert!(
        ours.iter()
            .any(|l| l.contains("http_route=\"unmatched\"") && l.ends_with(" 50")),
        "{ours:?}"
    );
    assert!(
        ours.iter()
            .any(|l| l.contains("http_route=\"/stack-g/v1/items/{id}\"")),
        "{ours:?}"
    );
    assert!(!text.contains("admin.php"));
}

#[tokio::test]
async fn info_describes_the_service() {
    let svc = ServiceBuilder::new("stack-h", 3)
        .config(config())
        .build_info(chassis::build_info!())
        .build()
        .unwrap();
    let (s, _, b) = call(&svc.router(), req("GET", "/info")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["service"], "stack-h");
    assert_eq!(b["api_version"], 3);
    assert_eq!(b["api_prefix"], "/stack-h/v3");
    assert_eq!(b["build"]["package"], "service-chassis");
    assert_eq!(b["build"]["version"], env!("CARGO_PKG_VERSION"));
    assert!(b["uptime_secs"].is_u64());
}

#[tokio::test]
async fn api_layers_run_inside_the_protection_layers() {
    use axum::middleware::{Next, from_fn};
    // A layer at the seam sees the correlation id set by the outer layers,
    // and its rejections are problem+json too.
    async fn gate(req: axum::extract::Request, next: Next) -> axum::response::Response {
        assert!(
            req.extensions()
                .get::<chassis::correlation::Correlation>()
                .is_some()
        );
        if req.headers().contains_key("x-deny") {
            return (StatusCode::FORBIDDEN, "denied by gate").into_response();
        }
        next.run(req).await
    }
    use axum::response::IntoResponse;
    let svc = ServiceBuilder::new("stack-i", 1)
        .api(
            Api::new().route(
                api::get("/ok", || async { "ok" })
                    .public()
                    .undocumented("a test route"),
            ),
        )
        .api_layer(from_fn(gate))
        .config(config())
        .build()
        .unwrap();
    let app = svc.router();
    assert_eq!(
        call(&app, req("GET", "/stack-i/v1/ok")).await.0,
        StatusCode::OK
    );
    let mut r = req("GET", "/stack-i/v1/ok");
    r.headers_mut().insert("x-deny", "1".parse().unwrap());
    let (s, h, b) = call(&app, r).await;
    assert_problem(s, &h, &b, 403);
    assert_eq!(b["detail"], "denied by gate");
    // The standard endpoints are outside the API and its layers.
    let mut r = req("GET", "/health/live");
    r.headers_mut().insert("x-deny", "1".parse().unwrap());
    assert_eq!(call(&app, r).await.0, StatusCode::OK);
}

#[test]
fn undeclared_routes_stop_the_build() {
    let err = ServiceBuilder::new("stack-j", 1)
        .api(
            Api::new()
                .route(
                    api::get("/open", || async { "ok" })
                        .public()
                        .undocumented("a test route"),
                )
                .route(api::post("/{account}/things", || async { "made" })),
        )
        .config(config())
        .build()
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("POST /stack-j/v1/{account}/things: declares neither a permission"),
        "{text}"
    );
}

#[tokio::test]
async fn configured_faults_hit_api_routes_only() {
    let mut c = config();
    c.fault = Some(chassis::fault::FaultConfig {
        abort_percent: 100.0,
        ..chassis::fault::FaultConfig::default()
    });
    let svc = ServiceBuilder::new("stack-k", 1)
        .api(
            Api::new().route(
                api::get("/ok", || async { "ok" })
                    .public()
                    .undocumented("a test route"),
            ),
        )
        .config(c)
        .build()
        .unwrap();
    let app = svc.router();
    let (s, h, b) = call(&app, req("GET", "/stack-k/v1/ok")).await;
    assert_problem(s, &h, &b, 503);
    assert_eq!(h["x-fault-injected"], "abort");
    assert_eq!(
        call(&app, req("GET", "/health/live")).await.0,
        StatusCode::OK
    );
}

/// Keeps the audit events of a service.
#[derive(Clone, Default)]
struct Memory(Arc<std::sync::Mutex<Vec<chassis::audit::AuditEvent>>>);

impl chassis::audit::AuditSink for Memory {
    fn write(&self, events: &[chassis::audit::AuditEvent]) -> std::io::Result<()> {
        self.0.lock().unwrap().extend_from_slice(events);
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn the_callers_deadline_shortens_the_timeout_and_every_refusal_is_audited() {
    let memory = Memory::default();
    let api = Api::new()
        .route(
            api::get(
                "/deadline",
                |deadline: Option<axum::Extension<chassis::protect::Deadline>>| async move {
                    match deadline {
                        Some(axum::Extension(d)) => format!(
                            "{}",
                            d.0.saturating_duration_since(tokio::time::Instant::now())
                                .as_millis()
                        ),
                        None => "none".to_owned(),
                    }
                },
            )
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
            api::post("/echo", |body: bytes::Bytes| async move { body })
                .public()
                .undocumented("a test route"),
        );
    let svc = ServiceBuilder::new("stack-dl", 1)
        .api(api)
        .config(config())
        .audit_sink(memory.clone())
        .build()
        .unwrap();
    let app = svc.router();
    let with_timeout = |uri: &str, ms: &str| {
        Request::get(uri)
            .header("x-correlation-id", "stack-test")
            .header("x-timeout-ms", ms)
            .body(Body::empty())
            .unwrap()
    };

    // The handler sees the caller's deadline; without one, none.
    let res = app
        .clone()
        .oneshot(with_timeout("/stack-dl/v1/deadline", "250"))
        .await
        .unwrap();
    let text = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(text, "250");
    // The same among many other headers.
    let mut crowded = with_timeout("/stack-dl/v1/deadline", "120");
    for i in 0..40 {
        crowded.headers_mut().insert(
            http::HeaderName::try_from(format!("x-other-{i}")).unwrap(),
            http::HeaderValue::from_static("v"),
        );
    }
    let res = app.clone().oneshot(crowded).await.unwrap();
    let text = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(text, "120");
    let (s, ..) = call(&app, req("GET", "/stack-dl/v1/deadline")).await;
    assert_eq!(s, StatusCode::OK);

    // A caller with 50 ms left gets its 504 after 50 ms, not after the
    // service's own timeout of 1 s.
    let started = tokio::time::Instant::now();
    let (s, h, b) = call(&app, with_timeout("/stack-dl/v1/slow", "50")).await;
    assert_problem(s, &h, &b, 504);
    assert_eq!(started.elapsed(), Duration::from_millis(50));

    // A caller that has stopped waiting: 504 at once, the work not started.
    let (s, h, b) = call(&app, with_timeout("/stack-dl/v1/slow", "0")).await;
    assert_problem(s, &h, &b, 504);
    assert!(
        b["detail"]
            .as_str()
            .unwrap()
            .contains("before the request started"),
        "{b}"
    );

    // A declared body over the limit: 413 before the handler.
    let big = Request::post("/stack-dl/v1/echo")
        .header("x-correlation-id", "stack-test")
        .header(header::CONTENT_LENGTH, "17")
        .body(Body::from("x".repeat(17)))
        .unwrap();
    let (s, h, b) = call(&app, big).await;
    assert_problem(s, &h, &b, 413);

    svc.auditor().flush();
    let events = memory.0.lock().unwrap().clone();
    let seen: Vec<(u16, &str, Option<&str>)> = events
        .iter()
        .map(|e| (e.status, e.decision.as_str(), e.reason))
        .collect();
    assert_eq!(
        seen,
        [
            (200, "allow", Some("public")),
            (200, "allow", Some("public")),
            (200, "allow", Some("public")),
            // Allowed, then cut by the deadline: the decision stands, the
            // status says how it ended.
            (504, "allow", Some("public")),
            // Refused before the guard: no decision but the refusal.
            (504, "rejected", Some("timeout")),
            (413, "rejected", Some("too_large")),
        ]
    );
    for e in &events {
        assert_eq!(e.correlation_id.as_ref().unwrap().as_str(), "stack-test");
        assert_eq!(&*e.service, "stack-dl");
    }
    // Latency counts from when the request was received: the timed-out
    // call took its 50 ms.
    assert!(
        (events[3].latency_ms - 50.0).abs() < 1.0,
        "{}",
        events[3].latency_ms
    );
}

#[tokio::test]
async fn a_handlers_5xx_body_goes_to_the_log_never_to_the_client() {
    let (logs, _guard) = support::Logs::capture("stack-leak");
    let long = format!("{}password=hunter2", "x".repeat(100_000));
    let api = Api::new()
        .route(
            api::get("/json", || async {
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    axum::Json(serde_json::json!({
                        "error": "query failed: no such table: users (password=hunter2)"
                    })),
                )
            })
            .public()
            .undocumented("a test route"),
        )
        .route(
            api::get("/busy", || async {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(header::RETRY_AFTER, "7")],
                    axum::Json(serde_json::json!({
                        "error": "pool timed out: postgres://app:hunter2@db.internal/orders"
                    })),
                )
            })
            .public()
            .undocumented("a test route"),
        )
        .route(
            api::get("/problem", || async {
                chassis::Problem::new(StatusCode::BAD_GATEWAY)
                    .with_type("https://example.test/leak")
                    .with_title("hunter2 title")
                    .with_detail("upstream said password=hunter2")
                    .with_member("sql", "SELECT * FROM users -- hunter2")
            })
            .public()
            .undocumented("a test route"),
        )
        .route(
            api::get("/long", move || {
                let long = long.clone();
                async move { (StatusCode::INTERNAL_SERVER_ERROR, long) }
            })
            .public()
            .undocumented("a test route"),
        );
    let app = ServiceBuilder::new("stack-leak", 1)
        .api(api)
        .config(config())
        .build()
        .unwrap()
        .router();
    for (path, status) in [
        ("/stack-leak/v1/json", 500),
        ("/stack-leak/v1/busy", 503),
        ("/stack-leak/v1/problem", 502),
        ("/stack-leak/v1/long", 500),
    ] {
        let (s, h, b) = call(&app, req("GET", path)).await;
        assert_problem(s, &h, &b, status);
        let text = b.to_string();
        assert!(!text.contains("hunter2"), "{path}: {text}");
        // The generic problem of the status, nothing of the handler's.
        let generic = chassis::Problem::new(s);
        assert_eq!(b["detail"], generic.detail(), "{path}");
        assert_eq!(b["type"], generic.kind(), "{path}");
        assert_eq!(b["title"], s.canonical_reason().unwrap(), "{path}");
        assert_eq!(
            b.as_object().unwrap().len(),
            5,
            "{path}: only the standard members: {text}"
        );
        if status == 503 {
            assert_eq!(h[header::RETRY_AFTER], "7");
        }
    }

    // Each withheld body is in the log, at error level, bounded, with the
    // request's correlation id.
    let lines = logs.lines();
    let withheld: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l["target"] == "chassis::problem")
        .collect();
    assert_eq!(withheld.len(), 4, "{lines:#?}");
    for (line, status) in withheld.iter().zip([500, 503, 502, 500]) {
        assert_eq!(line["level"], "ERROR", "{line}");
        assert_eq!(line["correlation_id"], "stack-test", "{line}");
        assert_eq!(line["status"], status, "{line}");
    }
    assert!(
        withheld[0]["body"]
            .as_str()
            .unwrap()
            .contains("no such table: users")
    );
    assert!(
        withheld[1]["body"]
            .as_str()
            .unwrap()
            .contains("postgres://")
    );
    let problem = withheld[2]["body"].as_str().unwrap();
    assert!(
        problem.contains("upstream said password=hunter2") && problem.contains("SELECT"),
        "{problem}"
    );
    // A long body is cut: the log line stays small.
    let long_line = lines
        .iter()
        .find(|l| l.contains("chassis::problem") && l.contains("xxxx"))
        .unwrap();
    assert!(long_line.len() < 8 * 1024, "{} bytes", long_line.len());
    assert!(!long_line.contains("hunter2"));
    assert_eq!(withheld[3]["truncated"], true);
}

#[cfg(feature = "client")]
#[tokio::test]
async fn a_downstream_failure_keeps_the_chassis_reason_code() {
    // A port nothing listens on: the call fails to connect.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let downstream = chassis::client::Downstream::builder("gone", &url)
        .max_attempts(1)
        .build()
        .unwrap();
    let api = Api::new().route(
        api::get("/call", move |cx: chassis::client::CallContext| {
            let d = downstream.clone();
            async move { d.anonymous(&cx).get("/x").send().await.map(|_| "reached") }
        })
        .public()
        .undocumented("a test route"),
    );
    let app = ServiceBuilder::new("stack-down", 1)
        .api(api)
        .config(config())
        .build()
        .unwrap()
        .router();
    let (s, h, b) = call(&app, req("GET", "/stack-down/v1/call")).await;
    assert_problem(s, &h, &b, 503);
    assert_eq!(b["reason"], "downstream_unavailable", "{b}");
    assert!(h.contains_key(header::RETRY_AFTER));
}

#[tokio::test]
async fn handlers_take_typed_state_and_apis_with_different_states_merge() {
    use axum::extract::State;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Clone)]
    struct Counter(Arc<AtomicU32>);

    async fn bump(State(Counter(n)): State<Counter>) -> String {
        (n.fetch_add(1, Ordering::SeqCst) + 1).to_string()
    }

    async fn greeting(State(text): State<&'static str>) -> &'static str {
        text
    }

    let counter = Counter(Arc::new(AtomicU32::new(0)));
    let counted = Api::new()
        .route(
            api::post("/bumps", bump)
                .public()
                .undocumented("a test route"),
        )
        .with_state(counter.clone());
    let greeted = Api::new()
        .route(
            api::get("/greeting", greeting)
                .public()
                .undocumented("a test route"),
        )
        .with_state("hello");
    let app = ServiceBuilder::new("stack-state", 1)
        .api(counted.merge(greeted))
        .api(
            Api::new().route(
                api::get("/plain", || async { "plain" })
                    .public()
                    .undocumented("a test route"),
            ),
        )
        .config(config())
        .build()
        .unwrap()
        .router();

    for want in ["1", "2"] {
        let res = app
            .clone()
            .oneshot(req("POST", "/stack-state/v1/bumps"))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, want);
    }
    // The handlers share the state the API was given.
    assert_eq!(counter.0.load(Ordering::SeqCst), 2);
    for (path, want) in [
        ("/stack-state/v1/greeting", "hello"),
        ("/stack-state/v1/plain", "plain"),
    ] {
        let res = app.clone().oneshot(req("GET", path)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{path}");
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, want, "{path}");
    }
}
