//! Consumer-driven contracts end to end: a driver client's calls to a real
//! provider on loopback recorded into a contract, the contract checked
//! against the provider's served document, and a changed document caught.

use axum::{Json, extract::Path, http::StatusCode};
use chassis::{
    Config, ServiceBuilder,
    api::{self, Api},
    client::{ClientError, Downstream},
    permission::AccountId,
    problem::Problem,
    testing::{
        TempDir, TestIssuer, TestServer,
        contract::{Contract, Recorder},
        fetch_openapi,
    },
};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// A lesson.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Lesson {
    /// Its id.
    pub id: String,
    /// Seats left.
    pub seats: u32,
    /// Its teacher, when one is assigned.
    pub teacher: Option<String>,
}

/// What booking takes.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Booking {
    /// Seats wanted.
    pub seats: u32,
}

async fn get(Path((_, id)): Path<(String, String)>) -> Result<Json<Lesson>, Problem> {
    if id == "lsn_1" {
        Ok(Json(Lesson {
            id,
            seats: 4,
            teacher: None,
        }))
    } else {
        Err(Problem::not_found())
    }
}

async fn book(
    Path((_, id)): Path<(String, String)>,
    Json(b): Json<Booking>,
) -> Result<Json<Lesson>, Problem> {
    if b.seats > 4 {
        return Err(Problem::new(StatusCode::CONFLICT)
            .with_detail("too few seats left")
            .with_member("reason", "full"));
    }
    Ok(Json(Lesson {
        id,
        seats: 4 - b.seats,
        teacher: Some("ada".to_owned()),
    }))
}

fn api() -> Api {
    Api::new()
        .route(
            api::get("/{account}/lessons/{id}", get)
                .public()
                .summary("A lesson")
                .response::<Lesson>(200)
                .problem(404, "No such lesson."),
        )
        .route(
            api::post("/{account}/lessons/{id}/book", book)
                .public()
                .summary("Book seats")
                .body::<Booking>()
                .response::<Lesson>(200)
                .problem(409, "`full`: too few seats left."),
        )
}

chassis::driver_client! {
    /// The driver client of `lessons`.
    pub type LessonsClient = DriverClient<Lessons>;
    /// The lessons API with one identity.
    pub struct Calls;
}

impl Calls<'_> {
    /// `GET /lessons/v1/{account}/lessons/{id}`.
    pub async fn get(self, account: &AccountId, id: &str) -> Result<Lesson, ClientError> {
        let path = self.0.path("/lessons/v1/{}/lessons/{}", &[account, &id])?;
        self.0.get_json(&path).await
    }

    /// `POST /lessons/v1/{account}/lessons/{id}/book`.
    pub async fn book(
        self,
        account: &AccountId,
        id: &str,
        seats: u32,
    ) -> Result<Lesson, ClientError> {
        let path = self
            .0
            .path("/lessons/v1/{}/lessons/{}/book", &[account, &id])?;
        self.0.post_json(&path, &Booking { seats }).await
    }
}

/// The lessons service on loopback, and the contract of a consumer
/// (`school`) that gets a lesson, books seats and handles a refusal.
async fn recorded() -> (TestServer, Contract) {
    let server = TestServer::start(
        ServiceBuilder::new("lessons", 1)
            .api(api())
            .verifier(TestIssuer::new().verifier())
            .config(Config::default())
            .build_info(chassis::build_info!()),
    )
    .await;
    let downstream: Downstream = Downstream::builder("lessons", &server.url(""))
        .build()
        .unwrap();
    let recorder = Recorder::new();
    assert!(downstream.record_into(&recorder));
    assert!(downstream.clone().record_into(&recorder), "clones share it");
    assert!(!downstream.record_into(&Recorder::new()), "one recorder");
    let client = LessonsClient::new(downstream);
    let cx = chassis::client::CallContext::background();
    let acme = AccountId::parse("acme").unwrap();
    let lesson = client.anonymous(&cx).get(&acme, "lsn_1").await.unwrap();
    assert_eq!(lesson.seats, 4);
    let booked = client.anonymous(&cx).book(&acme, "lsn_1", 3).await.unwrap();
    assert_eq!(booked.teacher.as_deref(), Some("ada"));
    let full = client
        .anonymous(&cx)
        .book(&acme, "lsn_1", 9)
        .await
        .unwrap_err();
    assert_eq!(full.reason(), Some("full"));
    assert!(
        client.anonymous(&cx).get(&acme, "../x").await.is_err(),
        "never sent"
    );

    let calls = recorder.calls();
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert_eq!(calls[0].template, "/lessons/v1/{}/lessons/{}");
    assert_eq!(calls[0].path, "/lessons/v1/acme/lessons/lsn_1");
    assert_eq!(calls[1].request, Some(json!({"seats": 3})));
    assert_eq!(calls[2].status, 409);
    (server, Contract::from_calls("school", "lessons", &calls))
}

#[tokio::test]
async fn a_recorded_contract_names_each_call_and_what_it_reads() {
    let (server, contract) = recorded().await;
    let names: Vec<String> = contract
        .interactions
        .iter()
        .map(|i| format!("{} {} {}", i.method, i.path, i.status))
        .collect();
    assert_eq!(
        names,
        [
            "GET /lessons/v1/{}/lessons/{} 200",
            "POST /lessons/v1/{}/lessons/{}/book 200",
            "POST /lessons/v1/{}/lessons/{}/book 409",
        ]
    );
    let get = &contract.interactions[0];
    assert_eq!(get.reads["seats"], "integer");
    assert_eq!(get.reads["teacher"], "null");
    let requires: Vec<&str> = get.requires.iter().map(String::as_str).collect();
    assert_eq!(requires, ["id", "seats"], "an Option is not required");
    assert_eq!(contract.interactions[1].sends["seats"], "integer");
    assert_eq!(contract.interactions[1].reads["teacher"], "string");
    assert!(
        contract.interactions[2].reads.is_empty(),
        "a refusal is read through ClientError"
    );
    // The live answers are valid against the live document.
    contract.assert_honoured_by(&server.url("")).await;
    server.stop().await;
}

#[tokio::test]
async fn a_committed_contract_must_say_what_the_code_does() {
    let (server, contract) = recorded().await;
    server.stop().await;
    let dir = TempDir::new("contract-up-to-date");
    let missing = std::panic::catch_unwind(|| contract.assert_up_to_date(dir.path()));
    let message = *missing.unwrap_err().downcast::<String>().unwrap();
    assert!(message.contains("CHASSIS_UPDATE_CONTRACTS=1"), "{message}");

    let file = dir.join("school-lessons.json");
    std::fs::write(&file, serde_json::to_string_pretty(&contract).unwrap()).unwrap();
    contract.assert_up_to_date(dir.path());

    // Other example values: still up to date.
    let mut values = contract.clone();
    values.interactions[0].response = Some(json!({"id": "lsn_2", "seats": 1, "teacher": null}));
    std::fs::write(&file, serde_json::to_string_pretty(&values).unwrap()).unwrap();
    contract.assert_up_to_date(dir.path());

    // A field the code no longer reads, a call it no longer makes: stale.
    let mut stale = contract.clone();
    stale.interactions[0]
        .reads
        .insert("room".to_owned(), "string".to_owned());
    stale.interactions.pop();
    std::fs::write(&file, serde_json::to_string_pretty(&stale).unwrap()).unwrap();
    let out = std::panic::catch_unwind(|| contract.assert_up_to_date(dir.path()));
    let message = *out.unwrap_err().downcast::<String>().unwrap();
    assert!(
        message.contains("changed: GET /lessons/v1/{}/lessons/{} → 200: reads -room"),
        "{message}"
    );
    assert!(
        message.contains("new: POST /lessons/v1/{}/lessons/{}/book → 409"),
        "{message}"
    );
    assert_eq!(
        Contract::load_for(dir.path(), "lessons").len(),
        1,
        "found by its provider"
    );
    assert!(Contract::load_for(dir.path(), "other").is_empty());
}

#[tokio::test]
async fn each_breaking_change_of_the_provider_is_named() {
    let (server, contract) = recorded().await;
    let document = fetch_openapi(&server.url(""), "lessons", 1).await;
    server.stop().await;
    assert_eq!(contract.check(std::slice::from_ref(&document)), []);

    let get = "school → lessons: GET /lessons/v1/{}/lessons/{} → 200";
    let book = "school → lessons: POST /lessons/v1/{}/lessons/{}/book → 200";
    let full = "school → lessons: POST /lessons/v1/{}/lessons/{}/book → 409";

    // A field no longer required: every interaction that reads it.
    let found = contract.breaches_if(&document, |d| {
        d["components"]["schemas"]["Lesson"]["required"] = json!(["id", "teacher"]);
    });
    assert_eq!(
        found,
        [
            format!(
                "{get}: `seats`, which school requires, may be left out: the 200 answer's schema does not require it"
            ),
            format!(
                "{book}: `seats`, which school requires, may be left out: the 200 answer's schema does not require it"
            ),
        ]
    );

    // A field of another type.
    let found = contract.breaches_if(&document, |d| {
        d["components"]["schemas"]["Lesson"]["properties"]["seats"] = json!({"type": "string"});
    });
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(
        found[0].starts_with(&format!(
            "{get}: `seats`, which school reads, no longer fits the 200 answer's schema: at /seats: "
        )),
        "{found:?}"
    );

    // A path renamed.
    let found = contract.breaches_if(&document, |d| {
        let paths = d["paths"].as_object_mut().unwrap();
        let item = paths
            .remove("/lessons/v1/{account}/lessons/{id}/book")
            .unwrap();
        paths.insert(
            "/lessons/v1/{account}/lessons/{id}/reserve".to_owned(),
            item,
        );
    });
    assert_eq!(
        found,
        [
            format!(
                "{book}: the provider's document has no operation POST /lessons/v1/{{}}/lessons/{{}}/book"
            ),
            format!(
                "{full}: the provider's document has no operation POST /lessons/v1/{{}}/lessons/{{}}/book"
            ),
        ]
    );

    // A field the consumer does not read changed, a new required field
    // added: not breaking.
    let found = contract.breaches_if(&document, |d| {
        let lesson = &mut d["components"]["schemas"]["Lesson"];
        lesson["properties"]["room"] = json!({"type": "string"});
        lesson["required"] = json!(["id", "seats", "room"]);
    });
    assert_eq!(found, Vec::<String>::new());

    // A parameter renamed: not a breaking change.
    let found = contract.breaches_if(&document, |d| {
        let paths = d["paths"].as_object_mut().unwrap();
        let item = paths.remove("/lessons/v1/{account}/lessons/{id}").unwrap();
        paths.insert("/lessons/v1/{tenant}/lessons/{lesson}".to_owned(), item);
    });
    assert_eq!(found, Vec::<String>::new());

    // A status changed: the 409 the consumer handles is no longer answered.
    let found = contract.breaches_if(&document, |d| {
        let responses = d["paths"]["/lessons/v1/{account}/lessons/{id}/book"]["post"]["responses"]
            .as_object_mut()
            .unwrap();
        let conflict = responses.remove("409").unwrap();
        responses.insert("410".to_owned(), conflict);
    });
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].starts_with(&format!(
            "{full}: status 409, which school handles, is not documented (documented: 200, "
        )),
        "{found:?}"
    );

    // A request field required that the consumer does not send.
    let found = contract.breaches_if(&document, |d| {
        let booking = &mut d["components"]["schemas"]["Booking"];
        booking["properties"]["student"] = json!({"type": "string"});
        booking["required"] = json!(["seats", "student"]);
    });
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(
        found[0].starts_with(&format!(
            "{book}: the request school sends is refused: at /: "
        )) && found[0].contains("student"),
        "{found:?}"
    );
}
