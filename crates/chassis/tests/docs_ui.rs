//! The docs page at `/<name>/v<N>/docs`, rendered by headless Chromium
//! from a service on a loopback port: every operation shown, every asset
//! from the service, nothing refused by its Content-Security-Policy, no
//! request off the machine. A screenshot is saved under the target folder
//! (`<target>/docs-ui/shop.png`) for review. Without Chromium the browser
//! tests say they did not run, unless `CHASSIS_REQUIRE_SERVERS` is set.

use axum::{Json, Router, http::StatusCode, response::Html, routing::get};
use chassis::{
    Config, ServiceBuilder,
    api::{self, Api, docs_ui},
    testing::{Browser, TestIssuer, TestServer},
};
use serde::{Deserialize, Serialize};

/// An order.
#[derive(Serialize, utoipa::ToSchema)]
struct Order {
    /// `ord_<uuid>`.
    id: String,
    /// Places.
    quantity: u32,
}

/// What placing an order takes.
#[derive(Deserialize, utoipa::ToSchema)]
struct NewOrder {
    /// Places, 1 to 10.
    quantity: u32,
}

async fn place(Json(new): Json<NewOrder>) -> (StatusCode, Json<Order>) {
    let order = Order {
        id: "ord_1".to_owned(),
        quantity: new.quantity,
    };
    (StatusCode::CREATED, Json(order))
}

async fn status() -> &'static str {
    "open"
}

fn api() -> Api {
    Api::new()
        .route(
            api::post("/{account}/orders", place)
                .requires("shop:{account}:create:order")
                .summary("Place an order")
                .body::<NewOrder>()
                .response::<Order>(201),
        )
        .route(
            api::get("/status", status)
                .public()
                .summary("Whether the shop is open")
                .response_as::<String>(200, "text/plain"),
        )
}

async fn shop() -> TestServer {
    TestServer::start(
        ServiceBuilder::new("shop", 1)
            .api(api())
            .verifier(TestIssuer::new().verifier())
            .config(Config::default()),
    )
    .await
}

#[tokio::test]
async fn chromium_renders_every_operation_from_the_service_alone() {
    let Some(browser) = Browser::or_skip("docs_ui: the docs page in Chromium") else {
        return;
    };
    let server = shop().await;
    let url = server.url("/shop/v1/docs");
    // Swagger UI ran: one block per operation, with its path, summary and
    // operation id, and the schemas; nothing refused, nothing failed,
    // nothing off the machine.
    browser
        .check_page(
            &url,
            &[
                "opblock-post",
                "opblock-get",
                "/shop/v1/{account}/orders",
                "/shop/v1/status",
                "Place an order",
                "Whether the shop is open",
                "operations-default-place",
                "operations-default-status",
                "NewOrder",
            ],
            "shop",
        )
        .await;
    // A deep link opens one operation: its permission (first line of its
    // description), parameters, body and answers with their examples, all
    // drawn under the same policy.
    let place = browser.load(&format!("{url}#/default/place")).await;
    for shown in [
        "shop:{account}:create:order",
        "Example Value",
        "403",
        "application/problem+json",
    ] {
        assert!(
            place.dom.contains(shown),
            "`{shown}` not in the open operation:\n{}",
            place.dom
        );
    }
    assert!(place.console.is_empty(), "{:#?}", place.console);
    assert!(place.left_loopback.is_empty(), "{:#?}", place.left_loopback);
    server.stop().await;
}

/// The check above can fail: a page that loads from elsewhere is caught,
/// both by the proxy that records requests off loopback and, under the
/// docs page's Content-Security-Policy, by the browser's refusal.
#[tokio::test]
async fn a_page_that_loads_from_elsewhere_is_caught() {
    let Some(browser) = Browser::or_skip("docs_ui: the control page in Chromium") else {
        return;
    };
    const PAGE: &str = r#"<!doctype html><html><head>
<link rel="stylesheet" href="https://cdn.example.com/swagger-ui.css">
</head><body><img src="http://images.example.com/logo.png"></body></html>"#;
    let app = Router::new()
        .route("/open", get(|| async { Html(PAGE) }))
        .route(
            "/strict",
            get(|| async {
                (
                    [(
                        http::header::CONTENT_SECURITY_POLICY,
                        docs_ui::CONTENT_SECURITY_POLICY,
                    )],
                    Html(PAGE),
                )
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = tokio::spawn(async move { axum::serve(listener, app).await });

    let open = browser.load(&format!("http://{addr}/open")).await;
    let joined = open.left_loopback.join("\n");
    assert!(joined.contains("cdn.example.com"), "{joined}");
    assert!(joined.contains("images.example.com"), "{joined}");

    let strict = browser.load(&format!("http://{addr}/strict")).await;
    assert!(
        strict.left_loopback.is_empty(),
        "{:#?}",
        strict.left_loopback
    );
    let console = strict.console.join("\n");
    assert!(
        console.contains("cdn.example.com") && console.contains("Content Security Policy"),
        "{console}"
    );
    served.abort();
}

#[tokio::test]
async fn the_page_and_assets_are_public_and_the_paths_reserved() {
    let server = shop().await;
    // No token: public, as the document is.
    let page = server
        .downstream()
        .anonymous(&chassis::client::CallContext::background())
        .get("/shop/v1/docs")
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    server.stop().await;

    for path in ["/docs", "/docs/{file}"] {
        let err = ServiceBuilder::new("shop", 1)
            .api(
                Api::new().route(
                    api::get(path, status)
                        .public()
                        .summary("Mine")
                        .response_as::<String>(200, "text/plain"),
                ),
            )
            .config(Config::default())
            .build()
            .map(|_| ())
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("reserved for the service's docs page"),
            "{err}"
        );
    }
}
