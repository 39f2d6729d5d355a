//! The `hello` binary as operators run it: real process, real socket, real
//! signals.

use std::process::Command;

use chassis::testing::{ProcessCheck, ServiceProcess};

use http_body_util::BodyExt;
use tower::ServiceExt;

async fn get(url: &str, headers: &[(&str, &str)]) -> (u16, http::HeaderMap, serde_json::Value) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let mut req = http::Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = client
        .request(req.body(http_body_util::Empty::new()).unwrap())
        .await
        .unwrap();
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        headers,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test]
async fn serves_logs_and_stops_cleanly_on_sigterm() {
    let hello = ServiceProcess::spawn(
        env!("CARGO_BIN_EXE_hello"),
        &[("CHASSIS_SHUTDOWN_GRACE_SECS", "5")],
    );
    let check = ProcessCheck::new("hello").package("hello-service");
    check.serving(&hello).await;
    let addr = hello.addr().to_owned();
    let (status, headers, body) = get(
        &format!("http://{addr}/hello/v1/greetings/ann"),
        &[
            ("x-correlation-id", "hello-test-1"),
            ("authorization", "Bearer do-not-log-me"),
        ],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["message"], "hello, ann");
    assert_eq!(headers["x-correlation-id"], "hello-test-1");

    let json = check.stopped(hello).await;
    let access: Vec<_> = json
        .iter()
        .filter(|l| l["target"] == "chassis::access" && l["correlation_id"] == "hello-test-1")
        .collect();
    assert_eq!(access.len(), 1, "{json:#?}");
    assert_eq!(access[0]["route"], "/hello/v1/greetings/{name}");
    assert_eq!(access[0]["status"], 200);
    assert_eq!(access[0]["service"], "hello");
    assert!(!format!("{json:?}").contains("do-not-log-me"));
}

#[test]
fn bad_configuration_exits_78_listing_every_problem() {
    chassis::testing::refused_settings(
        Command::new(env!("CARGO_BIN_EXE_hello"))
            .env("CHASSIS_BIND", "not-an-address")
            .env("CHASSIS_LOG_FORMAT", "xml")
            .env("CHASSIS_MAX_BODY_BYTES", "lots"),
        &[
            "CHASSIS_BIND",
            "CHASSIS_LOG_FORMAT",
            "CHASSIS_MAX_BODY_BYTES",
        ],
    );
}

#[tokio::test]
async fn long_names_are_a_problem_document() {
    let app = hello_service::service()
        .config(chassis::Config::default())
        .build()
        .unwrap()
        .router();
    let req = http::Request::get(format!("/hello/v1/greetings/{}", "a".repeat(65)))
        .body(axum::body::Body::empty())
        .unwrap();
    let res = app.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    let body: serde_json::Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["detail"], "name is longer than 64 characters");
    assert!(body["correlation_id"].is_string());
}
