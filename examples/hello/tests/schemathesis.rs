//! The API against its own OpenAPI document, property-based: schemathesis
//! (`.ci/schemathesis` installs it and sets `CHASSIS_SCHEMATHESIS`; without
//! it this test says it skipped) generates requests from the document and
//! checks every answer against it: no 5xx, every status, header and body
//! documented, invalid input refused, valid input accepted.

use chassis::testing::{Schemathesis, TestServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_matches_the_document() {
    let server =
        TestServer::start(hello_service::service().config(chassis::Config::default())).await;
    Schemathesis::new(&server.url(""), "hello", 1).run().await;
    server.stop().await;
}
