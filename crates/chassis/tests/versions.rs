//! Two versions of one API served side by side by one process, on a real
//! socket: each with its own routes, permissions and OpenAPI document; the
//! deprecated one marks every answer (`Deprecation`, `Sunset`, `Link`) and
//! is counted apart, the current one carries none of it; audit events say
//! which version was called.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use chassis::{
    Config, ServiceBuilder,
    api::{self, Api},
    service::ApiVersion,
    testing::{TestIssuer, TestServer, fetch_openapi},
};
use http::{Method, header};
use serde_json::json;
use support::{Answer, Events, send};

/// 2026-12-01T00:00:00Z.
const SINCE: u64 = 1_796_083_200;
/// 2027-06-30T23:59:59Z.
const SUNSET: u64 = 1_814_399_999;
const GUIDE: &str = "https://docs.example.com/shop/v1-to-v2";

/// An order as v1 shows it.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct OrderV1 {
    id: String,
    quantity: u32,
}

/// An order as v2 shows it: its lines.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct OrderV2 {
    id: String,
    lines: Vec<u32>,
}

fn v1() -> Api {
    Api::new()
        .route(
            api::get("/{account}/orders", || async {
                Json(vec![OrderV1 {
                    id: "ord_1".into(),
                    quantity: 2,
                }])
            })
            .requires("shop:{account}:view:order")
            .operation_id("list_orders")
            .response::<Vec<OrderV1>>(200),
        )
        .route(
            api::get("/status", || async {
                (
                    [(header::LINK, "</shop/v1/status?page=2>; rel=\"next\"")],
                    "open",
                )
            })
            .public()
            .response_as::<String>(200, "text/plain"),
        )
}

fn v2() -> Api {
    Api::new().route(
        api::get("/{account}/orders", || async {
            Json(vec![OrderV2 {
                id: "ord_1".into(),
                lines: vec![2],
            }])
        })
        // v2 has its own permission: a grant for it alone does not open v1.
        .requires("shop:{account}:list:order")
        .operation_id("list_orders")
        .response::<Vec<OrderV2>>(200),
    )
}

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

struct Shop {
    server: TestServer,
    issuer: TestIssuer,
    auditor: chassis::audit::Auditor,
    events: Events,
}

async fn shop(name: &str) -> Shop {
    let issuer = TestIssuer::new();
    let events = Events::default();
    let mut builder = ServiceBuilder::new(name, 2)
        .api(v2())
        .version(
            ApiVersion::new(1)
                .deprecated(at(SINCE))
                .sunset(at(SUNSET))
                .deprecation_link(GUIDE),
            v1(),
        )
        .verifier(issuer.verifier())
        .audit_sink(events.clone())
        .config(Config::default());
    let auditor = builder.shared_auditor().unwrap();
    let server = TestServer::start(builder).await;
    Shop {
        server,
        issuer,
        auditor,
        events,
    }
}

async fn call(shop: &Shop, method: Method, path: &str, token: Option<&str>) -> Answer {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("authorization", a)])
        .unwrap_or_default();
    send(method, &shop.server.url(path), &headers, "")
        .await
        .unwrap()
}

/// The `Link` values of an answer, each field on its own.
fn links(a: &Answer) -> Vec<String> {
    a.headers
        .get_all(header::LINK)
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect()
}

const V1_LINK: &str = "<https://docs.example.com/shop/v1-to-v2>; rel=\"deprecation\", </shop/v2/openapi.json>; rel=\"successor-version\"; type=\"application/json\"";

fn assert_deprecated(a: &Answer, what: &str) {
    assert_eq!(a.headers["deprecation"], "@1796083200", "{what}");
    assert_eq!(
        a.headers["sunset"], "Wed, 30 Jun 2027 23:59:59 GMT",
        "{what}"
    );
    assert!(
        links(a).iter().any(|l| l == V1_LINK),
        "{what}: {:?}",
        links(a)
    );
}

fn assert_current(a: &Answer, what: &str) {
    for name in ["deprecation", "sunset", "link"] {
        assert!(!a.headers.contains_key(name), "{what}: {name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_version_has_its_routes_and_permissions_and_only_v1_says_it_is_deprecated() {
    let shop = shop("shop").await;
    let v1_reader = shop.issuer.user_token("ann", &["shop:67000001:view:order"]);
    let v2_reader = shop.issuer.user_token("bob", &["shop:67000001:list:order"]);

    // The same path in each version, each with its own permission and shape.
    let a = call(
        &shop,
        Method::GET,
        "/shop/v1/67000001/orders",
        Some(&v1_reader),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json(), json!([{"id": "ord_1", "quantity": 2}]));
    assert_deprecated(&a, "v1 200");
    let a = call(
        &shop,
        Method::GET,
        "/shop/v2/67000001/orders",
        Some(&v2_reader),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json(), json!([{"id": "ord_1", "lines": [2]}]));
    assert_current(&a, "v2 200");

    // v2's grant does not open v1, nor v1's v2.
    let a = call(
        &shop,
        Method::GET,
        "/shop/v1/67000001/orders",
        Some(&v2_reader),
    )
    .await;
    assert_eq!(a.status, 403, "{}", a.text());
    assert_eq!(a.json()["permission"], "shop:67000001:view:order");
    assert_deprecated(&a, "v1 403");
    let a = call(
        &shop,
        Method::GET,
        "/shop/v2/67000001/orders",
        Some(&v1_reader),
    )
    .await;
    assert_eq!(a.status, 403, "{}", a.text());
    assert_eq!(a.json()["permission"], "shop:67000001:list:order");
    assert_current(&a, "v2 403");

    // Every error of v1 is marked, problem+json as always; none of v2's.
    for (path, method, token, status) in [
        ("/shop/{v}/67000001/orders", Method::GET, None, 401),
        (
            "/shop/{v}/not*valid/orders",
            Method::GET,
            Some(&v1_reader),
            404,
        ),
        ("/shop/{v}/nowhere", Method::GET, None, 404),
        ("/shop/{v}", Method::GET, None, 404),
        ("/shop/{v}/67000001/orders", Method::DELETE, None, 405),
    ] {
        for v in ["v1", "v2"] {
            let token = match (v, token) {
                ("v2", Some(_)) => Some(v2_reader.as_str()),
                (_, t) => t.map(String::as_str),
            };
            let path = path.replace("{v}", v);
            let a = call(&shop, method.clone(), &path, token).await;
            let what = format!("{method} {path}");
            assert_eq!(a.status.as_u16(), status, "{what}: {}", a.text());
            assert_eq!(
                a.headers[header::CONTENT_TYPE],
                "application/problem+json",
                "{what}"
            );
            assert!(a.headers.contains_key("x-correlation-id"), "{what}");
            if v == "v1" {
                assert_deprecated(&a, &what);
            } else {
                assert_current(&a, &what);
            }
        }
    }
    // A path outside every version's prefix is not v1's.
    let a = call(&shop, Method::GET, "/shop/v10/orders", None).await;
    assert_eq!(a.status, 404);
    assert_current(&a, "/shop/v10");

    // A route's own `Link` stays, beside the deprecation's.
    let a = call(&shop, Method::GET, "/shop/v1/status", None).await;
    assert_eq!(a.status, 200);
    assert_eq!(
        links(&a),
        ["</shop/v1/status?page=2>; rel=\"next\"", V1_LINK],
        "{:?}",
        a.headers
    );
    assert!(
        call(&shop, Method::GET, "/shop/v2/status", None)
            .await
            .status
            == 404
    );

    // The audit says which version each call was made to.
    shop.auditor.flush();
    let events = shop.events.0.lock().unwrap().clone();
    let versions = |route: &str| -> Vec<Option<u32>> {
        events
            .iter()
            .filter(|e| e.route.as_str() == route)
            .map(|e| e.api_version)
            .collect()
    };
    assert_eq!(
        versions("/shop/v1/{account}/orders"),
        [Some(1), Some(1), Some(1), Some(1), Some(1)]
    );
    assert_eq!(
        versions("/shop/v2/{account}/orders"),
        [Some(2), Some(2), Some(2), Some(2), Some(2)]
    );
    let logged = serde_json::to_value(&events[0]).unwrap();
    assert_eq!(logged["api_version"], 1, "{logged}");

    // Calls to v1 are counted apart, by route; v2 has no such series.
    let metrics = support::get(&shop.server.url("/metrics")).await.text();
    let count = |version: &str, route: &str| -> Option<u64> {
        metrics
            .lines()
            .filter(|l| l.starts_with("http_server_deprecated_requests_total{"))
            .filter(|l| l.contains("service=\"shop\""))
            .filter(|l| l.contains(&format!("api_version=\"{version}\"")))
            .find(|l| l.contains(&format!("http_route=\"{route}\"")))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    };
    assert_eq!(
        count("1", "/shop/v1/{account}/orders"),
        Some(5),
        "{metrics}"
    );
    assert_eq!(count("1", "/shop/v1/status"), Some(1), "{metrics}");
    assert_eq!(count("1", "unmatched"), Some(2), "{metrics}");
    assert!(
        !metrics.contains("api_version=\"2\""),
        "v2 is not deprecated: {metrics}"
    );
    // The route label still tells the versions apart in the RED metrics.
    assert!(
        metrics.contains("http_route=\"/shop/v1/{account}/orders\"")
            && metrics.contains("http_route=\"/shop/v2/{account}/orders\""),
        "{metrics}"
    );
    shop.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_version_has_its_document_and_info_lists_them() {
    let shop = shop("docs").await;
    let base = shop.server.url("");
    let v1 = fetch_openapi(&base, "docs", 1).await;
    let v2 = fetch_openapi(&base, "docs", 2).await;
    assert_eq!(v1["info"]["x-api-version"], 1);
    assert_eq!(v2["info"]["x-api-version"], 2);
    let op = &v1["paths"]["/docs/v1/{account}/orders"]["get"];
    assert_eq!(op["deprecated"], true, "{op}");
    assert_eq!(op["x-permission"], "shop:{account}:view:order");
    assert_eq!(
        v1["paths"]["/docs/v1/status"]["get"]["deprecated"], true,
        "every operation of v1"
    );
    assert_eq!(v1["info"]["x-deprecated-at"], "2026-12-01T00:00:00.000Z");
    assert_eq!(v1["info"]["x-sunset"], "2027-06-30T23:59:59.000Z");
    assert_eq!(v1["info"]["x-successor"], "/docs/v2/openapi.json");
    let description = v1["info"]["description"].as_str().unwrap();
    assert!(
        description.contains("**Deprecated** since 2026-12-01")
            && description.contains("after 2027-06-30T23:59:59.000Z"),
        "{description}"
    );
    let op = &v2["paths"]["/docs/v2/{account}/orders"]["get"];
    assert!(op.get("deprecated").is_none(), "{op}");
    assert_eq!(op["x-permission"], "shop:{account}:list:order");
    assert!(v2["paths"].get("/docs/v1/{account}/orders").is_none());
    assert!(v2["info"].get("x-sunset").is_none());

    // The document of v1 is a v1 answer too.
    let a = call(&shop, Method::GET, "/docs/v1/openapi.json", None).await;
    assert_eq!(a.headers["deprecation"], "@1796083200");
    let a = call(&shop, Method::GET, "/docs/v2/openapi.json", None).await;
    assert_current(&a, "v2's document");

    let info = call(&shop, Method::GET, "/info", None).await.json();
    assert_eq!(info["api_version"], 2);
    assert_eq!(info["api_prefix"], "/docs/v2");
    assert_eq!(
        info["api_versions"],
        json!([
            {
                "version": 1,
                "prefix": "/docs/v1",
                "openapi": "/docs/v1/openapi.json",
                "deprecated": true,
                "deprecated_at": "2026-12-01T00:00:00.000Z",
                "sunset_at": "2027-06-30T23:59:59.000Z",
                "deprecation_link": GUIDE,
                "successor": 2,
            },
            {
                "version": 2,
                "prefix": "/docs/v2",
                "openapi": "/docs/v2/openapi.json",
                "deprecated": false,
            },
        ])
    );
    shop.server.stop().await;
}

#[test]
fn every_problem_with_the_versions_is_listed_at_once() {
    let err = ServiceBuilder::new("shop", 2)
        .api(v2())
        .version(2, Api::new())
        .version(0, Api::new())
        .version(
            ApiVersion::new(1).deprecated(at(SUNSET)).sunset(at(SINCE)),
            v1(),
        )
        .version(ApiVersion::new(3).sunset(at(SUNSET)), Api::new())
        .config(Config::default())
        .build()
        .unwrap_err();
    let problems = err.problems();
    let text = err.to_string();
    // The four of the versions, and v1's and v2's routes, which require a
    // permission where nothing verifies tokens.
    assert_eq!(problems.len(), 6, "{text}");
    for expected in [
        "at least 1",
        "API version 2 is declared twice",
        "API version 1: its sunset (2026-12-01T00:00:00.000Z) is before its deprecation (2027-06-30T23:59:59.000Z)",
        "API version 3 has a sunset but no deprecation",
        "GET /shop/v1/{account}/orders: requires",
        "GET /shop/v2/{account}/orders: requires",
    ] {
        assert!(text.contains(expected), "{expected}: {text}");
    }
    // And a version's route problems name that version's prefix.
    let err = ServiceBuilder::new("shop", 2)
        .api(v2())
        .version(1, v1())
        .config(Config::default())
        .build()
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("GET /shop/v1/{account}/orders: requires")
            && text.contains("GET /shop/v2/{account}/orders: requires"),
        "{text}"
    );
}

/// A driver client says once that the version it calls is deprecated, and
/// its calls succeed as always.
#[tokio::test(flavor = "current_thread")]
async fn a_client_of_a_deprecated_version_is_told_once() {
    let (logs, _guard) = support::Logs::capture("client");
    let shop = shop("told").await;
    let downstream = shop.server.downstream();
    let cx = chassis::client::CallContext::background();
    for _ in 0..3 {
        let res = downstream
            .anonymous(&cx)
            .get("/told/v1/status")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    let current = downstream
        .anonymous(&cx)
        .get("/told/v2/openapi.json")
        .send()
        .await
        .unwrap();
    assert_eq!(current.status(), 200);
    let warned: Vec<serde_json::Value> = logs
        .lines()
        .iter()
        .filter(|l| l.contains("is deprecated"))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(warned.len(), 1, "{warned:?}");
    let w = &warned[0];
    assert_eq!(w["level"], "WARN", "{w}");
    assert_eq!(w["downstream"], "test");
    assert_eq!(w["deprecation"], "@1796083200");
    assert_eq!(w["sunset"], "Wed, 30 Jun 2027 23:59:59 GMT");
    assert_eq!(w["link"], V1_LINK.replace("/shop/v2/", "/told/v2/"));
    shop.server.stop().await;
}
