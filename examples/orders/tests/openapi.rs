//! The service's OpenAPI documents, as a client reads them from a running
//! server: every route of each version's table, with its permission and
//! its success schema; v1's marked deprecated. (`.ci/run` also validates
//! both as OpenAPI 3.1.)

mod support;

use chassis::testing::{Documented, assert_documents, fetch_openapi};
use support::System;

#[tokio::test]
async fn every_route_is_documented_with_its_permission() {
    let mut system = System::start("openapi", &[]).await;
    let doc = fetch_openapi(&system.orders.url(), "orders", 1).await;
    let v2 = fetch_openapi(&system.orders.url(), "orders", 2).await;
    system.orders.stop().await;
    assert_documents(
        &v2,
        &[
            Documented {
                method: "POST",
                path: "/orders/v2/{account}/orders",
                permission: "orders:{account}:create:order",
                status: 201,
                schema: "Order",
            },
            Documented {
                method: "GET",
                path: "/orders/v2/{account}/orders",
                permission: "orders:{account}:view:order",
                status: 200,
                schema: "Page_Order",
            },
            Documented {
                method: "GET",
                path: "/orders/v2/{account}/orders/{id}",
                permission: "orders:{account}:view:order",
                status: 200,
                schema: "Order",
            },
        ],
    );
    let order = &v2["components"]["schemas"]["Order"]["properties"];
    assert!(
        order["lines"].is_object() && order.get("ticket_id").is_none(),
        "{order}"
    );
    assert_eq!(
        doc["paths"]["/orders/v1/{account}/orders/{id}"]["get"]["deprecated"],
        true
    );
    assert_eq!(doc["info"]["x-successor"], "/orders/v2/openapi.json");
    assert_documents(
        &doc,
        &[
            Documented {
                method: "POST",
                path: "/orders/v1/{account}/orders",
                permission: "orders:{account}:create:order",
                status: 201,
                schema: "Order",
            },
            Documented {
                method: "GET",
                path: "/orders/v1/{account}/orders",
                permission: "orders:{account}:view:order",
                status: 200,
                schema: "Page_Order",
            },
            Documented {
                method: "GET",
                path: "/orders/v1/{account}/orders/{id}",
                permission: "orders:{account}:view:order",
                status: 200,
                schema: "Order",
            },
        ],
    );
    let place = &doc["paths"]["/orders/v1/{account}/orders"]["post"];
    assert_eq!(
        place["requestBody"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/NewOrder"
    );
    assert_eq!(
        doc["components"]["schemas"]["Order"]["properties"]["status"]["$ref"],
        "#/components/schemas/OrderStatus"
    );
}
