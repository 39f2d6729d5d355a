//! The API against its own OpenAPI document, property-based, with the
//! whole system behind it (auth, ticketing, mail): schemathesis
//! (`.ci/schemathesis` installs it and sets `CHASSIS_SCHEMATHESIS`; without
//! it this test says it skipped) generates requests from the document and
//! checks every answer against it: no 5xx, every status, header and body
//! documented, invalid input refused, valid input accepted, the token
//! required.

mod support;

use support::System;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_matches_the_document() {
    let mut system = System::start("schemathesis", &[]).await;
    // Alice holds `orders:acme:*:*`, from auth itself.
    let token = support::login(&system.auth.url(), "alice").await;
    chassis::testing::Schemathesis::new(&system.orders.url(), "orders", 1)
        .bearer(&token)
        .account("acme")
        .valid_may_answer(
            "GET /orders/v1/{account}/orders",
            &[422],
            "a cursor is opaque: only one the list handed out is valid, and any other string answers 422",
        )
        .valid_may_answer(
            "POST /orders/v1/{account}/orders",
            &[422],
            "the ticket must exist in ticketing (`no such ticket`), and an `Idempotency-Key` used \
             before with another body answers 422 `idempotency_key_reused`",
        )
        .run()
        .await;
    // v2, served beside it: the same rules in its own shape.
    chassis::testing::Schemathesis::new(&system.orders.url(), "orders", 2)
        .bearer(&token)
        .account("acme")
        .valid_may_answer(
            "GET /orders/v2/{account}/orders",
            &[422],
            "a cursor is opaque: only one the list handed out is valid, and any other string answers 422",
        )
        .valid_may_answer(
            "POST /orders/v2/{account}/orders",
            &[422],
            "the ticket must exist in ticketing (`no such ticket`), and an `Idempotency-Key` used \
             before with another body answers 422 `idempotency_key_reused`",
        )
        .run()
        .await;
    system.orders.stop().await;
}
