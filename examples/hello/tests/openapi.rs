//! The service's OpenAPI document, as a client reads it from a running
//! server: its route, public, with its success schema. (`.ci/run` also
//! validates it as OpenAPI 3.1.)

use chassis::testing::{Documented, TestServer, assert_documents, fetch_openapi};

#[tokio::test]
async fn the_route_is_documented_as_public() {
    let server =
        TestServer::start(hello_service::service().config(chassis::Config::default())).await;
    let doc = fetch_openapi(&server.url(""), "hello", 1).await;
    server.stop().await;
    assert_documents(
        &doc,
        &[Documented {
            method: "GET",
            path: "/hello/v1/greetings/{name}",
            permission: "public",
            status: 200,
            schema: "Greeting",
        }],
    );
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
}
