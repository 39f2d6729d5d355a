//! A service on a real loopback socket: metrics output, readiness, health
//! checks, graceful shutdown and header handling over the wire.

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use chassis::api::{self, Api};
use chassis::{
    Config,
    health::{CheckOptions, check_fn},
};
use http::{Method, StatusCode};
use support::{builder, eventually, get, send, start};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::Notify,
};

fn config() -> Config {
    let mut c = Config::default();
    c.shutdown_grace = Duration::from_secs(10);
    c
}

/// A service named `name` with one public route, `GET /items/{id}`.
fn items_service(name: &str) -> chassis::Service {
    builder(name)
        .api(
            Api::new().route(
                api::get("/items/{id}", || async { "item" })
                    .public()
                    .undocumented("a test route"),
            ),
        )
        .config(config())
        .build()
        .unwrap()
}

#[tokio::test]
async fn metrics_endpoint_follows_the_contract() {
    let running = start(items_service("serve-metrics")).await;
    assert_eq!(
        get(&running.url("/serve-metrics/v1/items/1")).await.status,
        200
    );
    assert_eq!(
        get(&running.url("/serve-metrics/v1/items/2")).await.status,
        200
    );
    assert_eq!(get(&running.url("/no/such/path")).await.status, 404);
    let res = send(
        Method::from_bytes(b"BREW").unwrap(),
        &running.url("/serve-metrics/v1/items/3"),
        &[],
        "",
    )
    .await
    .unwrap();
    assert_eq!(res.status, 405);

    let metrics = get(&running.url("/metrics")).await;
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = metrics.text();
    let series = parse(&text);
    let find = |name: &str, labels: &[(&str, &str)]| {
        series.iter().find(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
        })
    };
    let ok = [
        ("service", "serve-metrics"),
        ("http_request_method", "GET"),
        ("http_route", "/serve-metrics/v1/items/{id}"),
        ("http_response_status_code", "200"),
    ];
    assert_eq!(
        find("http_server_request_duration_seconds_count", &ok)
            .unwrap()
            .2,
        2.0
    );
    assert!(find("http_server_request_duration_seconds_sum", &ok).is_some());
    let mut bucket = ok.to_vec();
    bucket.push(("le", "0.005"));
    assert!(
        find("http_server_request_duration_seconds_bucket", &bucket).is_some(),
        "{text}"
    );
    bucket.pop();
    bucket.push(("le", "+Inf"));
    assert_eq!(
        find("http_server_request_duration_seconds_bucket", &bucket)
            .unwrap()
            .2,
        2.0
    );
    let unmatched = [
        ("service", "serve-metrics"),
        ("http_route", "unmatched"),
        ("http_response_status_code", "404"),
    ];
    assert_eq!(
        find("http_server_request_duration_seconds_count", &unmatched)
            .unwrap()
            .2,
        1.0
    );
    let other = [
        ("http_request_method", "_OTHER"),
        ("http_response_status_code", "405"),
    ];
    assert!(
        find("http_server_request_duration_seconds_count", &other).is_some(),
        "{text}"
    );
    let active = [("service", "serve-metrics"), ("http_request_method", "GET")];
    // The scrape itself is in flight while it renders.
    assert_eq!(find("http_server_active_requests", &active).unwrap().2, 1.0);
    assert!(text.contains("# TYPE http_server_request_duration_seconds histogram"));
    // Process metrics are there exactly when the `process-metrics` feature is.
    for process in [
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_start_time_seconds",
    ] {
        assert_eq!(
            series.iter().any(|(n, ..)| n == process),
            cfg!(feature = "process-metrics"),
            "{process}:\n{text}"
        );
    }
    assert!(!text.contains("/no/such/path"));
}

type Series = (String, Vec<(String, String)>, f64);

/// Parses the Prometheus text format (enough of it for these tests).
fn parse(text: &str) -> Vec<Series> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|line| {
            let (head, value) = line.rsplit_once(' ').expect("a sample has a value");
            let (name, labels) = match head.split_once('{') {
                Some((n, rest)) => {
                    let inner = rest.strip_suffix('}').expect("labels close");
                    let labels = inner
                        .split("\",")
                        .filter(|p| !p.is_empty())
                        .map(|p| {
                            let (k, v) = p.split_once("=\"").expect("label=value");
                            (k.to_owned(), v.trim_end_matches('"').to_owned())
                        })
                        .collect();
                    (n.to_owned(), labels)
                }
                None => (head.to_owned(), Vec::new()),
            };
            (name, labels, value.parse().unwrap_or(f64::NAN))
        })
        .collect()
}

/// The docs page beside the document: served with the `docs-ui` feature
/// (no token asked, as for the document), a 404 problem without it.
#[tokio::test]
async fn the_docs_page_is_served_with_its_feature_only() {
    let running = start(items_service("serve-docs")).await;
    let page = get(&running.url("/serve-docs/v1/docs")).await;
    let slash = get(&running.url("/serve-docs/v1/docs/")).await;
    if cfg!(feature = "docs-ui") {
        assert_eq!(page.status, 200);
        assert_eq!(page.headers["content-type"], "text/html; charset=utf-8");
        assert!(
            page.text().contains("swagger-ui-bundle.js"),
            "{}",
            page.text()
        );
        assert_eq!(slash.status, 308);
        assert_eq!(slash.headers["location"], "../docs");
    } else {
        for answer in [page, slash] {
            assert_eq!(answer.status, 404);
            assert_eq!(answer.headers["content-type"], "application/problem+json");
        }
    }
}

#[tokio::test]
async fn readiness_turns_503_while_in_flight_requests_finish() {
    let entered = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let (e, r) = (entered.clone(), release.clone());
    let mut cfg = config();
    // Keep the listener open after the signal so readiness can be observed.
    cfg.shutdown_delay = Duration::from_secs(3600);
    let svc = builder("serve-ready")
        .api(
            Api::new().route(
                api::get("/slow", move || {
                    let (e, r) = (e.clone(), r.clone());
                    async move {
                        e.notify_one();
                        r.notified().await;
                        "finished"
                    }
                })
                .public()
                .undocumented("a test route"),
            ),
        )
        .config(cfg)
        .build()
        .unwrap();
    let health = svc.health().clone();
    let mut running = start(svc).await;
    assert_eq!(get(&running.url("/health/ready")).await.status, 200);

    let slow_url = running.url("/serve-ready/v1/slow");
    let slow = tokio::spawn(async move { get(&slow_url).await });
    entered.notified().await;
    running.shutdown();
    eventually("readiness down", || {
        let h = health.clone();
        async move { h.is_shutting_down() }
    })
    .await;
    let ready = get(&running.url("/health/ready")).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready.json()["status"], "down");
    assert_eq!(get(&running.url("/health/live")).await.status, 200);

    release.notify_one();
    let slow = slow.await.unwrap();
    assert_eq!(slow.status, 200);
    assert_eq!(slow.text(), "finished");
    running.task.abort();
}

#[tokio::test]
async fn shutdown_closes_the_listener_and_waits_for_in_flight_requests() {
    let entered = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let (e, r) = (entered.clone(), release.clone());
    let task_stopped = Arc::new(AtomicBool::new(false));
    let stopped = task_stopped.clone();
    let svc = builder("serve-drain")
        .api(
            Api::new().route(
                api::get("/slow", move || {
                    let (e, r) = (e.clone(), r.clone());
                    async move {
                        e.notify_one();
                        r.notified().await;
                        "finished"
                    }
                })
                .public()
                .undocumented("a test route"),
            ),
        )
        .background("worker", move |token| async move {
            token.cancelled().await;
            stopped.store(true, Ordering::SeqCst);
        })
        .config(config())
        .build()
        .unwrap();
    let mut running = start(svc).await;
    let slow_url = running.url("/serve-drain/v1/slow");
    let slow = tokio::spawn(async move { get(&slow_url).await });
    entered.notified().await;
    running.shutdown();
    let addr = running.addr;
    eventually("listener closed", || async move {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    assert!(
        !running.task.is_finished(),
        "the in-flight request is still running"
    );
    release.notify_one();
    assert_eq!(slow.await.unwrap().status, 200);
    running.task.await.unwrap().unwrap();
    assert!(
        task_stopped.load(Ordering::SeqCst),
        "background task was cancelled and awaited"
    );
}

#[tokio::test]
async fn grace_deadline_cuts_requests_that_never_finish() {
    let entered = Arc::new(Notify::new());
    let e = entered.clone();
    let mut cfg = config();
    cfg.shutdown_grace = Duration::from_millis(1500);
    let svc = builder("serve-grace")
        .api(
            Api::new().route(
                api::get("/hang", move || {
                    let e = e.clone();
                    async move {
                        e.notify_one();
                        std::future::pending::<&'static str>().await
                    }
                })
                .public()
                .undocumented("a test route"),
            ),
        )
        .config(cfg)
        .build()
        .unwrap();
    let mut running = start(svc).await;
    let url = running.url("/serve-grace/v1/hang");
    let hung = tokio::spawn(async move { send(Method::GET, &url, &[], "").await });
    entered.notified().await;
    running.shutdown();
    // serve_with returns at the deadline even though the request never ends.
    tokio::time::timeout(Duration::from_secs(30), &mut running.task)
        .await
        .expect("shutdown finished within its deadline")
        .unwrap()
        .unwrap();
    hung.abort();
}

#[tokio::test]
async fn failing_and_hanging_checks_over_http() {
    let opts = CheckOptions::default()
        .interval(Duration::from_millis(50))
        .timeout(Duration::from_millis(200))
        .thresholds(1, 1);
    let svc = builder("serve-checks")
        .health_check(
            "db",
            check_fn(|| async { Err("connection refused".into()) }),
            opts,
        )
        .health_check(
            "slow",
            check_fn(|| async {
                std::future::pending::<()>().await;
                Ok(())
            }),
            opts,
        )
        .health_check(
            "cache",
            check_fn(|| async { Err("cache down".into()) }),
            opts.non_critical(),
        )
        .config(config())
        .build()
        .unwrap();
    let running_health = svc.health().clone();
    let running = start(svc).await;
    let url = running.url("/health/ready");
    let health = running_health.clone();
    eventually("the hanging check to time out", || {
        let health = health.clone();
        async move {
            health.report().checks["slow"].error.as_deref() == Some("timed out after 200 ms")
        }
    })
    .await;
    let r = get(&url).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers["content-type"], "application/json");
    let body = r.json();
    assert_eq!(
        body,
        serde_json::json!({
            "status": "down",
            "checks": {
                "cache": {"status": "down"},
                "db": {"status": "down"},
                "slow": {"status": "down"},
            }
        })
    );
    // In process, the whole report.
    let report = health.report();
    assert_eq!(
        report.checks["db"].error.as_deref(),
        Some("connection refused")
    );
    assert!(!report.checks["cache"].critical);
    assert!(report.checks["slow"].duration_ms.unwrap() >= 200);
    assert_eq!(get(&running.url("/health/live")).await.status, 200);
    running.task.abort();
}

/// A failing check whose error names a path and a URL: anyone sees the
/// check's name and state, only the log and an operator holding
/// `<service>::view:health` see the error.
#[cfg(feature = "testing")]
#[tokio::test]
async fn readiness_shows_errors_only_to_operators_and_the_log() {
    use chassis::testing::TestIssuer;
    let (logs, _guard) = support::Logs::capture("serve-ready");
    const ERROR: &str = "cannot open /var/lib/orders/orders.db: unable to open database file; \
                         replica https://db.internal:5432/orders?sslmode=require refused";
    let opts = CheckOptions::default()
        .interval(Duration::from_millis(20))
        .thresholds(1, 1);
    let issuer = TestIssuer::with("https://issuer.test", "serve-ready");
    let svc = builder("serve-ready")
        .health_check("database", check_fn(|| async { Err(ERROR.into()) }), opts)
        .verifier(issuer.verifier())
        .config(config())
        .build()
        .unwrap();
    let health = svc.health().clone();
    let running = start(svc).await;
    eventually("the check to run", || {
        let health = health.clone();
        async move { health.report().checks["database"].error.as_deref() == Some(ERROR) }
    })
    .await;

    for path in ["/health/ready", "/health/ready?verbose=1"] {
        let r = get(&running.url(path)).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        let text = r.text();
        for secret in [
            "/var/lib",
            "orders.db",
            "https://",
            "db.internal",
            "unable to open",
        ] {
            assert!(!text.contains(secret), "{path}: {secret} in {text}");
        }
        assert_eq!(
            r.json(),
            serde_json::json!({"status": "down", "checks": {"database": {"status": "down"}}})
        );
    }

    // The detail view needs a token holding the permission.
    let url = running.url("/health/ready?detail");
    let r = get(&url).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    assert_eq!(r.json()["reason"], "missing_token");
    assert!(!r.text().contains("db.internal"));
    let bearer = |perms: &[&str]| format!("Bearer {}", issuer.user_token("ops", perms));
    let viewer = bearer(&["serve-ready:acme:view:health", "other::view:health"]);
    let r = send(Method::GET, &url, &[("authorization", &viewer)], "")
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
    assert_eq!(r.json()["permission"], "serve-ready::view:health");
    assert!(!r.text().contains("db.internal"));
    let operator = bearer(&["serve-ready::view:health"]);
    let r = send(Method::GET, &url, &[("authorization", &operator)], "")
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    let body = r.json();
    assert_eq!(body["checks"]["database"]["error"], ERROR);
    assert_eq!(body["checks"]["database"]["critical"], true);

    // The log has the error, once, when the check turned down.
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|l: &serde_json::Value| l["message"] == "health check down")
        .collect();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert_eq!(lines[0]["check"], "database");
    assert_eq!(lines[0]["error"], ERROR);
    assert_eq!(lines[0]["level"], "WARN");
    running.task.abort();
}

#[tokio::test]
async fn correlation_over_the_wire() {
    let svc = builder("serve-corr")
        .api(
            Api::new().route(
                api::get(
                    "/id",
                    |id: chassis::correlation::CorrelationId| async move { id.to_string() },
                )
                .public()
                .undocumented("a test route"),
            ),
        )
        .config(config())
        .build()
        .unwrap();
    let running = start(svc).await;
    let url = running.url("/serve-corr/v1/id");
    let r = send(Method::GET, &url, &[("x-correlation-id", "abc-123")], "")
        .await
        .unwrap();
    assert_eq!(r.headers["x-correlation-id"], "abc-123");
    assert_eq!(r.text(), "abc-123");

    // R3: raw bytes with a bare CR trying to smuggle a header.
    let mut stream = tokio::net::TcpStream::connect(running.addr).await.unwrap();
    stream
        .write_all(b"GET /serve-corr/v1/id HTTP/1.1\r\nhost: x\r\nx-correlation-id: abc\rSet-Cookie: x=1\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw)).await;
    let text = String::from_utf8_lossy(&raw).to_lowercase();
    assert!(
        text.starts_with("http/1.1 400") || !text.contains("x-correlation-id: abc\r"),
        "{text}"
    );
    assert!(!text.contains("set-cookie"), "{text}");

    // Obs-text (0x80-0xff) and overlong values are replaced, not echoed.
    let mut stream = tokio::net::TcpStream::connect(running.addr).await.unwrap();
    let long = "z".repeat(200);
    let mut req =
        b"GET /serve-corr/v1/id HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-correlation-id: "
            .to_vec();
    req.extend_from_slice(long.as_bytes());
    req.extend_from_slice(b"\xff\r\n\r\n");
    stream.write_all(&req).await.unwrap();
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw)).await;
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(!text.contains(&long), "{text}");
    running.task.abort();
}

/// Routes that require permissions with no way to verify tokens is a
/// deployment problem: `run` says which setting is missing and exits 78,
/// before binding anything. (Without the `jwt` feature it is a build
/// problem instead, exit 70: see `tests/without_jwt.rs`.)
#[cfg(feature = "jwt")]
#[tokio::test]
async fn run_refuses_protected_routes_without_token_verification() {
    let code = builder("serve-noauth")
        .api(
            chassis::api::Api::new().route(
                chassis::api::get("/{account}/items", || async { "items" })
                    .requires("serve-noauth:{account}:view:item")
                    .undocumented("a test route"),
            ),
        )
        .config(chassis::Config::default())
        .run()
        .await;
    assert_eq!(code, std::process::ExitCode::from(78));
}

#[tokio::test]
async fn handlers_see_the_peer_address_when_asked_for() {
    use axum::extract::ConnectInfo;
    let peer = || {
        Api::new().route(
            api::get(
                "/peer",
                |info: Option<axum::Extension<ConnectInfo<std::net::SocketAddr>>>| async move {
                    info.map_or_else(|| "none".to_owned(), |i| i.0.0.ip().to_string())
                },
            )
            .public()
            .undocumented("a test route"),
        )
    };
    let on = builder("serve-peer")
        .api(peer())
        .peer_addresses()
        .config(config())
        .build()
        .unwrap();
    let running = start(on).await;
    assert_eq!(
        get(&running.url("/serve-peer/v1/peer")).await.text(),
        "127.0.0.1"
    );

    let off = builder("serve-nopeer")
        .api(peer())
        .config(config())
        .build()
        .unwrap();
    let running = start(off).await;
    assert_eq!(
        get(&running.url("/serve-nopeer/v1/peer")).await.text(),
        "none"
    );
}

/// The keys of one JSON log line, in order, duplicates kept (a map would
/// hide a key written twice).
fn keys_of(line: &str) -> Vec<String> {
    struct Keys(Vec<String>);
    impl<'de> serde::de::Visitor<'de> for Keys {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            mut self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            while let Some((k, _)) = map.next_entry::<String, serde::de::IgnoredAny>()? {
                self.0.push(k);
            }
            Ok(self.0)
        }
    }
    let mut de = serde_json::Deserializer::from_str(line);
    serde::Deserializer::deserialize_map(&mut de, Keys(Vec::new())).expect("a JSON object")
}

#[tokio::test]
async fn start_and_stop_lines_carry_each_field_once() {
    let (logs, _guard) = support::Logs::capture("serve-fields");
    let svc = builder("serve-fields").config(config()).build().unwrap();
    let mut running = start(svc).await;
    running.shutdown();
    running.task.await.unwrap().unwrap();
    let lines = logs.lines();
    for message in ["listening", "stopped"] {
        let line = lines
            .iter()
            .find(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["message"] == message)
            .unwrap_or_else(|| panic!("no `{message}` line in {lines:?}"));
        let keys = keys_of(line);
        let mut unique = keys.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), keys.len(), "a key written twice: {line}");
        assert!(!keys.iter().any(|k| k.starts_with("field.")), "{line}");
        let value: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(value["service"], "serve-fields", "{line}");
    }
    // Every line the service wrote while starting and stopping.
    for line in &lines {
        assert!(
            !keys_of(line).iter().any(|k| k.starts_with("field.")),
            "{line}"
        );
    }
}
