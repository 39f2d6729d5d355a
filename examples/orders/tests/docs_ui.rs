//! Orders' docs page, as a person opens it: the running service's
//! `/orders/v1/docs` rendered by headless Chromium, every route of its
//! table shown from its OpenAPI document, every asset from the service,
//! nothing off the machine. The screenshot is saved at
//! `<target>/docs-ui/orders.png` for review. Without Chromium the test
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
    let url = format!("{}/orders/v1/docs", system.orders.url());
    browser
        .check_page(
            &url,
            &[
                "/orders/v1/{account}/orders",
                "/orders/v1/{account}/orders/{id}",
                "opblock-post",
                "opblock-get",
                "NewOrder",
                "Order",
            ],
            "orders",
        )
        .await;
    system.orders.stop().await;
}
