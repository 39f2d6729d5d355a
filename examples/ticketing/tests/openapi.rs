//! The service's OpenAPI document, as a client reads it from a running
//! server: every route of its table, with its permission and its success
//! schema. (`.ci/run` also validates it as OpenAPI 3.1.)

mod support;

use chassis::testing::{Documented, assert_documents, fetch_openapi};
use support::{Data, Server};

const fn route(
    method: &'static str,
    path: &'static str,
    permission: &'static str,
    status: u16,
    schema: &'static str,
) -> Documented {
    Documented {
        method,
        path,
        permission,
        status,
        schema,
    }
}

#[tokio::test]
async fn every_route_is_documented_with_its_permission() {
    let data = Data::new("ticketing-openapi");
    let server = Server::start(&data, &[]).await;
    let doc = fetch_openapi(&format!("http://{}", server.addr), "ticketing", 1).await;
    server.stop().await;
    assert_documents(
        &doc,
        &[
            route(
                "POST",
                "/ticketing/v1/{account}/tickets",
                "ticketing:{account}:create:ticket",
                201,
                "Ticket",
            ),
            route(
                "GET",
                "/ticketing/v1/{account}/tickets",
                "ticketing:{account}:view:ticket",
                200,
                "Page_Ticket",
            ),
            route(
                "GET",
                "/ticketing/v1/{account}/tickets/{id}",
                "ticketing:{account}:view:ticket",
                200,
                "Ticket",
            ),
            route(
                "POST",
                "/ticketing/v1/{account}/reservations",
                "ticketing:{account}:reserve:ticket",
                201,
                "Reservation",
            ),
            route(
                "GET",
                "/ticketing/v1/{account}/reservations/{id}",
                "ticketing:{account}:view:ticket",
                200,
                "Reservation",
            ),
            route(
                "POST",
                "/ticketing/v1/{account}/reservations/{id}/confirm",
                "ticketing:{account}:reserve:ticket",
                200,
                "Reservation",
            ),
            route(
                "POST",
                "/ticketing/v1/{account}/reservations/{id}/release",
                "ticketing:{account}:reserve:ticket",
                200,
                "Reservation",
            ),
        ],
    );
    let schemas = &doc["components"]["schemas"];
    assert_eq!(
        schemas["Ticket"]["properties"]["valid_from"]["format"],
        "date"
    );
    assert_eq!(
        schemas["Reservation"]["properties"]["status"]["$ref"],
        "#/components/schemas/ReservationStatus"
    );
    assert_eq!(
        schemas["ReservationStatus"]["enum"],
        serde_json::json!(["held", "confirmed", "released", "expired"])
    );
    let reserve = &doc["paths"]["/ticketing/v1/{account}/reservations"]["post"];
    assert_eq!(
        reserve["requestBody"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/NewReservation"
    );
    assert_eq!(reserve["parameters"][1]["name"], "Idempotency-Key");
    assert!(
        reserve["responses"]["409"]["description"]
            .as_str()
            .unwrap()
            .contains("sold_out")
    );
}
