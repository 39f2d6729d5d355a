//! A chassis built without the `jwt` feature: public routes are served as
//! in any build, and a route that requires a permission stops the build
//! with a message that names the missing feature, so a service never runs
//! with routes nothing can authenticate.
//!
//! Run with `cargo test -p service-chassis --no-default-features --features
//! process-metrics` (the builds with `jwt` skip this file).

#![cfg(not(feature = "jwt"))]

use std::process::ExitCode;

use axum::body::Body;
use chassis::{
    Config, ServiceBuilder,
    api::{self, Api},
    service::EXIT_SOFTWARE,
};
use http::Request;
use tower::ServiceExt;

fn protected(name: &str) -> ServiceBuilder {
    ServiceBuilder::new(name, 1)
        .api(
            Api::new()
                .route(
                    api::get("/status", || async { "open" })
                        .public()
                        .undocumented("a test route"),
                )
                .route(
                    api::get("/{account}/items", || async { "items" })
                        .requires(&format!("{name}:{{account}}:view:item"))
                        .undocumented("a test route"),
                ),
        )
        .config(Config::default())
}

#[test]
fn a_route_that_requires_a_permission_fails_the_build_naming_the_feature() {
    let err = protected("nojwt-build").build().unwrap_err();
    assert_eq!(err.problems().len(), 1, "{err}");
    let problem = &err.problems()[0];
    assert!(
        problem.starts_with(
            "GET /nojwt-build/v1/{account}/items: requires `nojwt-build:{account}:view:item`"
        ),
        "{problem}"
    );
    assert!(problem.contains("enable the `jwt` feature"), "{problem}");
    assert!(
        err.to_string().contains("`jwt` feature"),
        "the error's message names the feature: {err}"
    );
}

#[tokio::test]
async fn run_exits_70_before_binding() {
    // A programming problem (the service was built without the part it
    // needs), not a deployment one: EX_SOFTWARE, not EX_CONFIG.
    let code = protected("nojwt-run").run().await;
    assert_eq!(code, ExitCode::from(EXIT_SOFTWARE));
}

#[tokio::test]
async fn public_routes_are_served() {
    let app = ServiceBuilder::new("nojwt-public", 1)
        .api(
            Api::new().route(
                api::get("/status", || async { "open" })
                    .public()
                    .undocumented("a test route"),
            ),
        )
        .config(Config::default())
        .build()
        .unwrap()
        .router();
    let res = app
        .clone()
        .oneshot(
            Request::get("/nojwt-public/v1/status")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers().contains_key("x-correlation-id"));
    // The readiness detail view needs a verified token: refused, not served.
    let res = app
        .oneshot(
            Request::get("/health/ready?detail")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
}
