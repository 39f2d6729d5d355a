//! The OpenAPI document a service serves at `/<name>/v<N>/openapi.json`:
//! built from the route table, over a real socket, without a token.

use axum::{Json, http::StatusCode};
use chassis::{
    Config, ServiceBuilder,
    api::{self, Api},
    page::{Page, PageRequest},
    testing::{Documented, TestIssuer, TestServer, assert_documents, fetch_openapi},
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// An order.
#[derive(Clone, Serialize, Deserialize, utoipa::ToSchema)]
struct Order {
    /// Its id.
    id: String,
    /// Places.
    quantity: u32,
    status: Status,
}

/// Where an order is.
#[derive(Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
enum Status {
    Placed,
    Cancelled,
}

/// What placing an order takes.
#[derive(Deserialize, utoipa::ToSchema)]
struct NewOrder {
    quantity: u32,
}

async fn place(Json(new): Json<NewOrder>) -> (StatusCode, Json<Order>) {
    (
        StatusCode::CREATED,
        Json(Order {
            id: "ord_1".to_owned(),
            quantity: new.quantity,
            status: Status::Placed,
        }),
    )
}

async fn list(page: PageRequest) -> Page<Order> {
    page.page(Vec::new(), |o: &Order| (String::new(), o.id.clone()))
}

async fn status() -> &'static str {
    "open"
}

fn api() -> Api {
    Api::new()
        .route(
            api::post("/{account}/orders", place)
                .requires("shop:{account}:create:order")
                .summary("Place an order")
                .header_matching(
                    "Idempotency-Key",
                    true,
                    "^[A-Za-z0-9._~:-]{1,255}$",
                    "Makes a retry safe.",
                )
                .body::<NewOrder>()
                .response::<Order>(201)
                .problem(409, "`sold_out`: not enough places left."),
        )
        .route(
            api::get("/{account}/orders", list)
                .requires("shop:{account}:view:order")
                .summary("List orders, newest first")
                .page::<Order>(),
        )
        .route(
            api::get("/status", status)
                .public()
                .summary("Whether the shop is open")
                .response_as::<String>(200, "text/plain"),
        )
        .route(
            api::delete("/{account}/orders/{id}", || async {
                StatusCode::NO_CONTENT
            })
            .requires("shop:{account}:delete:order")
            .undocumented("a test route")
            .param("id", "The order's id, `ord_<uuid>`.")
            .undocumented("kept for old clients"),
        )
}

async fn document() -> Value {
    let server = TestServer::start(
        ServiceBuilder::new("shop", 2)
            .api(api())
            .verifier(TestIssuer::new().verifier())
            .config(Config::default())
            .build_info(chassis::build_info!()),
    )
    .await;
    let doc = fetch_openapi(&server.url(""), "shop", 2).await;
    server.stop().await;
    doc
}

#[tokio::test]
async fn every_route_is_served_with_its_permission_and_success_schema() {
    let doc = document().await;
    assert_documents(
        &doc,
        &[
            Documented {
                method: "POST",
                path: "/shop/v2/{account}/orders",
                permission: "shop:{account}:create:order",
                status: 201,
                schema: "Order",
            },
            Documented {
                method: "GET",
                path: "/shop/v2/{account}/orders",
                permission: "shop:{account}:view:order",
                status: 200,
                schema: "Page_Order",
            },
            Documented {
                method: "GET",
                path: "/shop/v2/status",
                permission: "public",
                status: 200,
                schema: "",
            },
            Documented {
                method: "DELETE",
                path: "/shop/v2/{account}/orders/{id}",
                permission: "shop:{account}:delete:order",
                status: 403,
                schema: "",
            },
        ],
    );
    assert_eq!(doc["info"]["title"], "shop");
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(doc["info"]["x-api-version"], 2);
    assert_eq!(doc["servers"][0]["url"], "/");
    let scheme = &doc["components"]["securitySchemes"]["bearer"];
    assert_eq!(scheme["type"], "http");
    assert_eq!(scheme["scheme"], "bearer");
    assert_eq!(scheme["bearerFormat"], "JWT");
}

#[tokio::test]
async fn the_chassis_adds_its_own_answers_as_problems() {
    let doc = document().await;
    let ops = &doc["paths"];
    let place = &ops["/shop/v2/{account}/orders"]["post"];
    let statuses = |op: &Value| -> Vec<String> {
        op["responses"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    };
    assert_eq!(
        statuses(place),
        [
            "201", "400", "401", "403", "404", "409", "413", "415", "422", "500", "503", "504"
        ]
    );
    for status in [
        "400", "401", "403", "404", "409", "413", "415", "500", "503", "504",
    ] {
        assert_eq!(
            place["responses"][status]["content"]["application/problem+json"]["schema"]["$ref"],
            "#/components/schemas/Problem",
            "{status}"
        );
    }
    assert_eq!(
        place["responses"]["422"]["content"]["application/problem+json"]["schema"]["$ref"],
        "#/components/schemas/ValidationProblem"
    );
    assert!(place["responses"]["401"]["headers"]["WWW-Authenticate"].is_object());
    assert!(place["responses"]["503"]["headers"]["Retry-After"].is_object());
    assert_eq!(place["operationId"], "place");
    assert_eq!(place["summary"], "Place an order");
    assert_eq!(
        place["requestBody"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/NewOrder"
    );
    let params: Vec<(&str, &str)> = place["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p["in"].as_str().unwrap()))
        .collect();
    assert_eq!(params, [("account", "path"), ("Idempotency-Key", "header")]);
    assert_eq!(
        place["parameters"][1]["schema"]["pattern"],
        "^[A-Za-z0-9._~:-]{1,255}$"
    );
    assert_eq!(place["parameters"][1]["required"], true);
    assert_eq!(
        place["parameters"][0]["schema"]["pattern"],
        "^[A-Za-z0-9_-]{1,64}$"
    );

    // A list: its query parameters, 422 for them, no 400/413 without a body.
    let list = &ops["/shop/v2/{account}/orders"]["get"];
    assert_eq!(
        statuses(list),
        ["200", "401", "403", "404", "422", "500", "503", "504"]
    );
    let names: Vec<&str> = list["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["account", "limit", "cursor"]);
    assert_eq!(list["parameters"][1]["schema"]["maximum"], 100);
    assert!(list["responses"]["200"]["headers"]["Link"].is_object());
    let page = &doc["components"]["schemas"]["Page_Order"];
    assert_eq!(
        page["properties"]["items"]["items"]["$ref"],
        "#/components/schemas/Order"
    );
    assert_eq!(page["required"], serde_json::json!(["items", "next"]));

    // A public route: no 401/403, no security, no 404 without parameters.
    let status = &ops["/shop/v2/status"]["get"];
    assert_eq!(statuses(status), ["200", "500", "503", "504"]);
    assert!(status.get("security").is_none());
    assert_eq!(status["x-permission"], "public");
    assert!(
        status["description"]
            .as_str()
            .unwrap()
            .starts_with("**Public**")
    );
    assert!(status["responses"]["200"]["content"]["text/plain"].is_object());

    // An undocumented route says why, and keeps its permission.
    let delete = &ops["/shop/v2/{account}/orders/{id}"]["delete"];
    assert_eq!(
        delete["responses"]["default"]["description"],
        "Not documented: kept for old clients"
    );
    assert_eq!(
        delete["parameters"][1]["description"],
        "The order's id, `ord_<uuid>`."
    );
    assert_eq!(delete["operationId"], "delete_account_orders_id");

    // The problem schema is what `Problem` writes.
    let problem = &doc["components"]["schemas"]["Problem"];
    assert_eq!(
        problem["required"],
        serde_json::json!(["type", "title", "status", "detail"])
    );
    for member in [
        "type",
        "title",
        "status",
        "detail",
        "correlation_id",
        "reason",
    ] {
        assert!(problem["properties"][member].is_object(), "{member}");
    }
    let status_enum = &doc["components"]["schemas"]["Status"]["enum"];
    assert_eq!(*status_enum, serde_json::json!(["placed", "cancelled"]));
}

#[tokio::test]
async fn a_real_problem_has_what_the_problem_schema_requires() {
    use http_body_util::BodyExt;
    let server = TestServer::start(
        ServiceBuilder::new("shop", 2)
            .api(api())
            .verifier(TestIssuer::new().verifier())
            .config(Config::default()),
    )
    .await;
    let doc = fetch_openapi(&server.url(""), "shop", 2).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let res = client
        .get(server.url("/shop/v2/acme/orders").parse().unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    let body: Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    server.stop().await;
    let schema = &doc["components"]["schemas"]["Problem"];
    for member in schema["required"].as_array().unwrap() {
        let member = member.as_str().unwrap();
        let value = &body[member];
        let expected = schema["properties"][member]["type"].as_str().unwrap();
        let ok = match expected {
            "string" => value.is_string(),
            "integer" => value.is_u64(),
            other => panic!("unexpected type {other}"),
        };
        assert!(ok, "{member} of {body} is not {expected}");
    }
    for member in body.as_object().unwrap().keys() {
        assert!(
            schema["properties"].get(member).is_some(),
            "`{member}` of the 401 is not described by the Problem schema"
        );
    }
}
