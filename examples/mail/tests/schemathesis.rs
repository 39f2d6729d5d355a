//! The API against its own OpenAPI document, property-based: schemathesis
//! (`.ci/schemathesis` installs it and sets `CHASSIS_SCHEMATHESIS`; without
//! it this test says it skipped) generates requests from the document and
//! checks every answer against it: no 5xx, every status, header and body
//! documented, invalid input refused, valid input accepted, the token
//! required.

mod support;

use support::{SEND, Server, TempDir, issuer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_matches_the_document() {
    let dir = TempDir::new("schemathesis");
    let server = Server::start(&dir, &[]).await;
    let token = issuer().user_token("admin", &[SEND, support::VIEW]);
    chassis::testing::Schemathesis::new(&server.url(""), "mail", 1)
        .bearer(&token)
        .valid_may_answer(
            "POST /mail/v1/messages",
            &[422],
            "what `data` must hold depends on `template`, and `to` is an RFC 5322 address",
        )
        .run()
        .await;
    server.stop().await;
}
