//! The API against its own OpenAPI document, property-based: schemathesis
//! (`.ci/schemathesis` installs it and sets `CHASSIS_SCHEMATHESIS`; without
//! it this test says it skipped) generates requests from the document and
//! checks every answer against it: no 5xx, every status, header and body
//! documented, invalid input refused, valid input accepted, the token
//! required.

mod support;

use chassis::testing::{Schemathesis, TestIssuer};
use support::{Data, Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_matches_the_document() {
    let data = Data::new("ticketing-schemathesis");
    let server = Server::start(&data, &[]).await;
    // Everything in account `acme`, where most generated calls go.
    let token = TestIssuer::new().user_token("alice", &["ticketing:acme:*:*"]);
    Schemathesis::new(&format!("http://{}", server.addr), "ticketing", 1)
        .bearer(&token)
        .account("acme")
        .valid_may_answer(
            "GET /ticketing/v1/{account}/tickets",
            &[422],
            "a cursor is opaque: only one the list handed out is valid, and any other string answers 422",
        )
        .valid_may_answer(
            "POST /ticketing/v1/{account}/tickets",
            &[422],
            "`valid_until` must not be before `valid_from`: one field against another",
        )
        .valid_may_answer(
            "POST /ticketing/v1/{account}/reservations",
            &[422],
            "an `Idempotency-Key` used before with another body answers 422 `idempotency_key_reused`",
        )
        .run()
        .await;
    server.stop().await;
}
