//! The service's OpenAPI document, as a client reads it from a running
//! server: every route of its table, with its permission and its success
//! schema. (`.ci/run` also validates it as OpenAPI 3.1.)

mod support;

use chassis::testing::{Documented, assert_documents, fetch_openapi};
use support::{Server, TempDir};

#[tokio::test]
async fn every_route_is_documented_with_its_permission() {
    let dir = TempDir::new("mail-openapi");
    let server = Server::start(&dir, &[]).await;
    let doc = fetch_openapi(&server.url(""), "mail", 1).await;
    server.stop().await;
    assert_documents(
        &doc,
        &[
            Documented {
                method: "POST",
                path: "/mail/v1/messages",
                permission: "mail::send:message",
                status: 202,
                schema: "Accepted",
            },
            Documented {
                method: "GET",
                path: "/mail/v1/messages/{id}",
                permission: "mail::view:message",
                status: 200,
                schema: "Message",
            },
        ],
    );
    let send = &doc["paths"]["/mail/v1/messages"]["post"];
    assert_eq!(
        send["requestBody"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/MailJob"
    );
    assert_eq!(
        doc["components"]["schemas"]["Message"]["properties"]["status"]["$ref"],
        "#/components/schemas/MessageStatus"
    );
}
