//! Orders' docs pages, as a person opens them: the running service's
//! `/orders/v2/docs` and the deprecated `/orders/v1/docs` rendered by
//! headless Chromium, every route of each version's table shown from its
//! OpenAPI document (v1's marked deprecated), every asset from the service,
//! nothing off the machine. The screenshots are saved at
//! `<target>/docs-ui/orders.png` and `orders-v1.png` for review. Without Chromium the test
//! says it did not run, unless `CHASSIS_REQUIRE_SERVERS` is set.

mod support;

use chassis::testing::Browser;
use support::System;

#[tokio::test]
async fn the_docs_page_shows_every_route() {
    let Some(browser) = Browser::or_skip("orders docs_ui: the docs page in Chromium") else {
        return;
    };
    let mut system = System::start("docs-ui", &[]).await;
    let url = format!("{}/orders/v2/docs", system.orders.url());
    browser
        .check_page(
            &url,
            &[
                "/orders/v2/{account}/orders",
                "/orders/v2/{account}/orders/{id}",
                "opblock-post",
                "opblock-get",
                "NewOrder",
                "Order",
            ],
            "orders",
        )
        .await;
    // The deprecated version's page shows its own routes, each marked so.
    let url = format!("{}/orders/v1/docs", system.orders.url());
    let v1 = browser
        .check_page(
            &url,
            &[
                "/orders/v1/{account}/orders",
                "/orders/v1/{account}/orders/{id}",
                "opblock-deprecated",
                "Deprecated",
            ],
            "orders-v1",
        )
        .await;
    assert!(
        !v1.dom.contains("data-path=\"/orders/v2/"),
        "v1's page shows only v1's routes"
    );
    system.orders.stop().await;
}
