//! The API against its own OpenAPI document, property-based: schemathesis
//! (`.ci/schemathesis` installs it and sets `CHASSIS_SCHEMATHESIS`; without
//! it this test says it skipped) generates requests from the document and
//! checks every answer against it: no 5xx, every status, header and body
//! documented (the token endpoint's OAuth errors and its 429 included),
//! invalid input refused, valid input accepted, the token required.

mod support;

use support::Data;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_matches_the_document() {
    let data = Data::new("auth-schemathesis");
    let auth = support::start(&data).await;
    // The demo's administrator: every administrative permission.
    let token = auth.access_token("admin").await;
    chassis::testing::Schemathesis::new(&auth.url(""), "auth", 1)
        .bearer(&token)
        .valid_may_answer(
            "POST /auth/v1/token",
            &[400],
            "each grant type needs its own fields (RFC 6749 §5.2: `invalid_request`, 400), which \
             the form's one schema cannot say",
        )
        .run()
        .await;
    auth.stop().await;
}
