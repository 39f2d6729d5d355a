//! The ticketing API over a real socket: real tokens, the real permission
//! checks, a database of its own per test (SQLite or Postgres, as
//! `CHASSIS_TEST_BACKEND` says). Most calls go through the driver
//! client, which tests it too.

mod support;

use std::{collections::BTreeSet, time::Duration};

use chassis::{
    client::{CallContext, ClientError, ClientResponse},
    page::Page,
    permission::AccountId,
};
use http::HeaderValue;
use serde_json::{Value, json};
use support::{Data, Server, alice, day_pass, eventually, raw_http, refusal, user};
use ticketing::client::{NewReservation, ReservationStatus, Ticket};

fn acme() -> AccountId {
    AccountId::parse("acme").unwrap()
}

/// `POST path` with a JSON `body` (and an `Idempotency-Key`), as `cx`.
async fn post_json(
    server: &Server,
    cx: &CallContext,
    path: &str,
    body: &str,
    key: Option<&str>,
) -> Result<ClientResponse, ClientError> {
    let mut req = server.downstream().on_behalf_of(cx).post(path).body(
        body.to_owned(),
        HeaderValue::from_static("application/json"),
    );
    if let Some(key) = key {
        req = req.idempotency_key(key);
    }
    req.send().await
}

fn reservation_body(ticket_id: &str, quantity: u32) -> String {
    json!({"ticket_id": ticket_id, "quantity": quantity}).to_string()
}

#[tokio::test]
async fn tickets_are_created_listed_and_fetched() {
    let dir = Data::new("tickets");
    let server = Server::start(&dir, &[]).await;
    let cx = alice().await;
    let api = server.client();
    let calls = api.on_behalf_of(&cx);

    let before = time::OffsetDateTime::now_utc() - Duration::from_secs(1);
    let pass = calls.create_ticket(&acme(), &day_pass(100)).await.unwrap();
    assert!(pass.id.starts_with("tkt_"), "{}", pass.id);
    let uuid = uuid::Uuid::parse_str(&pass.id["tkt_".len()..]).unwrap();
    assert_eq!(uuid.get_version_num(), 7);
    assert_eq!(pass.account, "acme");
    assert_eq!(
        (pass.name.as_str(), pass.price_minor, pass.currency.as_str()),
        ("Day pass", 4500, "EUR")
    );
    assert_eq!((pass.capacity, pass.available), (100, 100));
    assert_eq!(pass.valid_from.to_string(), "2026-12-01");
    assert!(pass.created_at >= before && pass.created_at <= time::OffsetDateTime::now_utc());

    let mut week = day_pass(20);
    week.name = "Week pass".to_owned();
    let week = calls.create_ticket(&acme(), &week).await.unwrap();

    assert_eq!(calls.get_ticket(&acme(), &pass.id).await.unwrap(), pass);
    assert_eq!(
        calls.list_tickets(&acme(), None).await.unwrap(),
        Page {
            items: vec![pass.clone(), week],
            next: None
        }
    );

    // The wire format, as the contract spells it.
    let res = server
        .downstream()
        .on_behalf_of(&cx)
        .get(&format!("/ticketing/v1/acme/tickets/{}", pass.id))
        .send()
        .await
        .unwrap();
    let body: Value = res.json().unwrap();
    assert_eq!(body["valid_from"], "2026-12-01");
    assert_eq!(body["valid_until"], "2027-04-30");
    let created_at = body["created_at"].as_str().unwrap();
    assert!(created_at.ends_with('Z'), "{created_at}");
    time::OffsetDateTime::parse(created_at, &time::format_description::well_known::Rfc3339)
        .unwrap();

    // A new ticket is answered 201.
    let res = post_json(
        &server,
        &cx,
        "/ticketing/v1/acme/tickets",
        &serde_json::to_string(&day_pass(5)).unwrap(),
        None,
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 201);
    server.stop().await;
}

#[tokio::test]
async fn invalid_bodies_are_422_naming_every_field() {
    let dir = Data::new("invalid");
    let server = Server::start(&dir, &[]).await;
    let cx = alice().await;
    let fields = |problem: &Value| -> BTreeSet<String> {
        problem["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                assert!(e["detail"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
                let pointer = e["pointer"].as_str().unwrap();
                pointer.strip_prefix("#/").unwrap().to_owned()
            })
            .collect()
    };
    let set = |names: &[&str]| {
        names
            .iter()
            .map(|s| (*s).to_owned())
            .collect::<BTreeSet<_>>()
    };

    let bad = json!({
        "name": "", "price_minor": -1, "currency": "eur", "capacity": 0,
        "valid_from": "2027-01-01", "valid_until": "2026-01-01",
    });
    let (status, problem) = refusal(
        post_json(
            &server,
            &cx,
            "/ticketing/v1/acme/tickets",
            &bad.to_string(),
            None,
        )
        .await,
    );
    assert_eq!(status, 422);
    assert_eq!(problem["status"], 422);
    assert_eq!(problem["reason"], "invalid_fields");
    assert_eq!(problem["correlation_id"], cx.correlation().id().as_str());
    assert_eq!(
        fields(&problem),
        set(&["name", "price_minor", "currency", "capacity", "valid_until"])
    );

    // Missing fields and wrong types, all named at once.
    let bad = json!({"name": "x".repeat(101), "price_minor": "4500", "valid_from": "1 May"});
    let (status, problem) = refusal(
        post_json(
            &server,
            &cx,
            "/ticketing/v1/acme/tickets",
            &bad.to_string(),
            None,
        )
        .await,
    );
    assert_eq!(status, 422);
    assert_eq!(
        fields(&problem),
        set(&[
            "name",
            "price_minor",
            "currency",
            "capacity",
            "valid_from",
            "valid_until"
        ])
    );

    let (status, problem) = refusal(
        post_json(
            &server,
            &cx,
            "/ticketing/v1/acme/reservations",
            r#"{"quantity": 0}"#,
            None,
        )
        .await,
    );
    assert_eq!(status, 422);
    assert_eq!(fields(&problem), set(&["ticket_id", "quantity"]));

    let (status, problem) =
        refusal(post_json(&server, &cx, "/ticketing/v1/acme/tickets", "[1, 2]", None).await);
    assert_eq!(
        (status, problem["reason"].as_str()),
        (422, Some("invalid_fields"))
    );

    // Nothing was stored.
    let tickets = server
        .client()
        .on_behalf_of(&cx)
        .all_tickets(&acme())
        .await
        .unwrap();
    assert!(tickets.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn malformed_json_is_a_problem_with_the_correlation_id() {
    let dir = Data::new("malformed");
    let server = Server::start(&dir, &[]).await;
    let token = chassis::testing::TestIssuer::new().user_token("alice", &["ticketing:acme:*:*"]);
    let answer = raw_http(
        server.addr,
        &format!(
            "POST /ticketing/v1/acme/tickets HTTP/1.1\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nx-correlation-id: malformed-1\r\n\r\n{{\"name\": "
        ),
    )
    .await;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 400"), "{answer}");
    assert!(
        head.contains("content-type: application/problem+json"),
        "{answer}"
    );
    let problem: Value = serde_json::from_str(body).unwrap();
    assert_eq!(problem["status"], 400);
    assert_eq!(problem["correlation_id"], "malformed-1");

    // Without a JSON content type: 415, also a problem.
    let answer = raw_http(
        server.addr,
        &format!(
            "POST /ticketing/v1/acme/tickets HTTP/1.1\r\nAuthorization: Bearer {token}\r\n\
             x-correlation-id: malformed-2\r\n\r\n{{}}"
        ),
    )
    .await;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 415"), "{answer}");
    let problem: Value = serde_json::from_str(body).unwrap();
    assert_eq!(problem["correlation_id"], "malformed-2");
    server.stop().await;
}

#[tokio::test]
async fn calls_without_a_token_are_401() {
    let dir = Data::new("unauthenticated");
    let server = Server::start(&dir, &[]).await;
    let cx = CallContext::background();
    for path in [
        "/ticketing/v1/acme/tickets",
        "/ticketing/v1/acme/reservations/rsv_1",
    ] {
        let (status, problem) = refusal(server.downstream().anonymous(&cx).get(path).send().await);
        assert_eq!(status, 401, "{path}");
        assert_eq!(problem["reason"], "missing_token");
        assert_eq!(problem["correlation_id"], cx.correlation().id().as_str());
    }
    server.stop().await;
}

#[tokio::test]
async fn other_accounts_are_403_and_their_ids_404() {
    let dir = Data::new("accounts");
    let server = Server::start(&dir, &[]).await;
    let api = server.client();
    let cx = alice().await;
    let pass = api
        .on_behalf_of(&cx)
        .create_ticket(&acme(), &day_pass(10))
        .await
        .unwrap();
    let held = api
        .on_behalf_of(&cx)
        .reserve(
            &acme(),
            &NewReservation {
                ticket_id: pass.id.clone(),
                quantity: 1,
            },
            "k1",
        )
        .await
        .unwrap();

    // Alice has no grant in globex.
    let globex = AccountId::parse("globex").unwrap();
    let (status, problem) = refusal(api.on_behalf_of(&cx).list_tickets(&globex, None).await);
    assert_eq!(status, 403);
    assert_eq!(problem["reason"], "forbidden");
    assert_eq!(problem["permission"], "ticketing:globex:view:ticket");
    let (status, problem) = refusal(
        api.on_behalf_of(&cx)
            .reserve(
                &globex,
                &NewReservation {
                    ticket_id: pass.id.clone(),
                    quantity: 1,
                },
                "k2",
            )
            .await,
    );
    assert_eq!(
        (status, problem["permission"].as_str()),
        (403, Some("ticketing:globex:reserve:ticket"))
    );
    // A view-only grant does not reserve.
    let viewer = user("victor", &["ticketing:acme:view:ticket"]).await;
    assert_eq!(
        api.on_behalf_of(&viewer)
            .get_ticket(&acme(), &pass.id)
            .await
            .unwrap()
            .available,
        9
    );
    let (status, _) = refusal(api.on_behalf_of(&viewer).confirm(&acme(), &held.id).await);
    assert_eq!(status, 403);

    // In an account she may use, acme's ids do not exist: 404, exactly as
    // for an id that never existed.
    let both = user("alice", &["ticketing:acme:*:*", "ticketing:initech:*:*"]).await;
    let initech = AccountId::parse("initech").unwrap();
    let calls = api.on_behalf_of(&both);
    let (status, no_ticket) = refusal(calls.get_ticket(&acme(), "tkt_nope").await);
    assert_eq!(status, 404);
    assert_eq!(no_ticket["detail"], "The account has no such ticket.");
    let (status, no_reservation) = refusal(calls.get_reservation(&acme(), "rsv_nope").await);
    assert_eq!(status, 404);
    assert_eq!(
        no_reservation["detail"],
        "The account has no such reservation."
    );
    let same_as = |unknown: &Value, (status, problem): (u16, Value)| {
        assert_eq!(status, 404);
        assert_eq!(problem["detail"], unknown["detail"]);
        assert_eq!(problem["type"], unknown["type"]);
    };
    let not_found = |refused| same_as(&no_ticket, refused);
    not_found(refusal(calls.get_ticket(&initech, &pass.id).await));
    not_found(refusal(
        calls
            .reserve(
                &initech,
                &NewReservation {
                    ticket_id: pass.id.clone(),
                    quantity: 1,
                },
                "k3",
            )
            .await,
    ));
    let not_found = |refused| same_as(&no_reservation, refused);
    not_found(refusal(calls.get_reservation(&initech, &held.id).await));
    not_found(refusal(calls.confirm(&initech, &held.id).await));
    not_found(refusal(calls.release(&initech, &held.id).await));
    assert!(calls.all_tickets(&initech).await.unwrap().is_empty());

    // And nothing changed in acme.
    let still = calls.get_reservation(&acme(), &held.id).await.unwrap();
    assert_eq!(still.status, ReservationStatus::Held);
    assert_eq!(
        calls.get_ticket(&acme(), &pass.id).await.unwrap().available,
        9
    );
    server.stop().await;
}

#[tokio::test]
async fn reservations_confirm_and_release_idempotently() {
    let dir = Data::new("lifecycle");
    let server = Server::start(&dir, &[]).await;
    let api = server.client();
    let cx = alice().await;
    let calls = api.on_behalf_of(&cx);
    let pass = calls.create_ticket(&acme(), &day_pass(5)).await.unwrap();
    let two = NewReservation {
        ticket_id: pass.id.clone(),
        quantity: 2,
    };

    let before = time::OffsetDateTime::now_utc() - Duration::from_secs(1);
    let sold = calls.reserve(&acme(), &two, "sale").await.unwrap();
    assert!(sold.id.starts_with("rsv_"), "{}", sold.id);
    assert_eq!(
        (
            sold.account.as_str(),
            sold.ticket_id.as_str(),
            sold.quantity
        ),
        ("acme", pass.id.as_str(), 2)
    );
    assert_eq!(sold.status, ReservationStatus::Held);
    // Held for the default 900 s.
    let hold = sold.expires_at - sold.created_at;
    assert_eq!(hold.whole_seconds(), 900);
    assert!(sold.created_at >= before);
    assert_eq!(
        calls.get_ticket(&acme(), &pass.id).await.unwrap().available,
        3
    );
    assert_eq!(
        calls.get_reservation(&acme(), &sold.id).await.unwrap(),
        sold
    );

    let confirmed = calls.confirm(&acme(), &sold.id).await.unwrap();
    assert_eq!(confirmed.status, ReservationStatus::Confirmed);
    assert_eq!(confirmed.id, sold.id);
    // Confirming again is a success, and changes nothing.
    assert_eq!(calls.confirm(&acme(), &sold.id).await.unwrap(), confirmed);
    assert_eq!(
        calls.get_reservation(&acme(), &sold.id).await.unwrap(),
        confirmed
    );
    assert_eq!(
        calls.get_ticket(&acme(), &pass.id).await.unwrap().available,
        3
    );
    // A sale is not given back by release.
    let result = calls.release(&acme(), &sold.id).await;
    assert_eq!(
        result.as_ref().unwrap_err().reason(),
        Some("reservation_confirmed")
    );
    assert_eq!(refusal(result).0, 409);

    let dropped = calls.reserve(&acme(), &two, "dropped").await.unwrap();
    assert_eq!(
        calls.get_ticket(&acme(), &pass.id).await.unwrap().available,
        1
    );
    let released = calls.release(&acme(), &dropped.id).await.unwrap();
    assert_eq!(released.status, ReservationStatus::Released);
    assert_eq!(
        calls.get_ticket(&acme(), &pass.id).await.unwrap().available,
        3
    );
    // Releasing again is a success, and gives nothing back twice.
    assert_eq!(calls.release(&acme(), &dropped.id).await.unwrap(), released);
    assert_eq!(
        calls.get_ticket(&acme(), &pass.id).await.unwrap().available,
        3
    );
    // A released reservation cannot be confirmed.
    let result = calls.confirm(&acme(), &dropped.id).await;
    assert_eq!(
        result.as_ref().unwrap_err().reason(),
        Some("reservation_released")
    );
    let (status, problem) = refusal(result);
    assert_eq!(status, 409);
    assert_eq!(problem["correlation_id"], cx.correlation().id().as_str());

    // Unknown ids and ids that are not ids.
    assert_eq!(refusal(calls.confirm(&acme(), "rsv_nope").await).0, 404);
    assert!(matches!(
        calls.get_reservation(&acme(), "../tickets").await,
        Err(ClientError::InvalidRequest { .. })
    ));
    server.stop().await;
}

#[tokio::test]
async fn an_idempotency_key_replays_the_first_reservation() {
    let dir = Data::new("idempotency");
    let server = Server::start(&dir, &[]).await;
    let cx = user("alice", &["ticketing:acme:*:*", "ticketing:initech:*:*"]).await;
    let api = server.client();
    let pass = api
        .on_behalf_of(&cx)
        .create_ticket(&acme(), &day_pass(10))
        .await
        .unwrap();
    let path = "/ticketing/v1/acme/reservations";
    let body = reservation_body(&pass.id, 3);

    let first = post_json(&server, &cx, path, &body, Some("order-1"))
        .await
        .unwrap();
    assert_eq!(first.status(), 201);
    let again = post_json(&server, &cx, path, &body, Some("order-1"))
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    let (first, again): (Value, Value) = (first.json().unwrap(), again.json().unwrap());
    assert_eq!(first, again);
    // One reservation, not two.
    let ticket = api
        .on_behalf_of(&cx)
        .get_ticket(&acme(), &pass.id)
        .await
        .unwrap();
    assert_eq!(ticket.available, 7);
    // The driver client sends the key too, and gets the same reservation.
    let replayed = api
        .on_behalf_of(&cx)
        .reserve(
            &acme(),
            &NewReservation {
                ticket_id: pass.id.clone(),
                quantity: 3,
            },
            "order-1",
        )
        .await
        .unwrap();
    assert_eq!(replayed.id, first["id"].as_str().unwrap());
    // The replay answers the reservation as it is now.
    api.on_behalf_of(&cx)
        .confirm(&acme(), &replayed.id)
        .await
        .unwrap();
    let res = post_json(&server, &cx, path, &body, Some("order-1"))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().unwrap()["status"], "confirmed");

    // The same key for another request is refused, not replayed.
    let (status, problem) = refusal(
        post_json(
            &server,
            &cx,
            path,
            &reservation_body(&pass.id, 4),
            Some("order-1"),
        )
        .await,
    );
    assert_eq!(
        (status, problem["reason"].as_str()),
        (422, Some("idempotency_key_reused"))
    );

    // Keys are per account: initech's "order-1" is its own.
    let initech = AccountId::parse("initech").unwrap();
    let theirs = api
        .on_behalf_of(&cx)
        .create_ticket(&initech, &day_pass(10))
        .await
        .unwrap();
    let res = post_json(
        &server,
        &cx,
        "/ticketing/v1/initech/reservations",
        &reservation_body(&theirs.id, 3),
        Some("order-1"),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 201);

    // Without a key, each call is a new reservation.
    for _ in 0..2 {
        let res = post_json(&server, &cx, path, &reservation_body(&pass.id, 1), None)
            .await
            .unwrap();
        assert_eq!(res.status(), 201);
    }
    let ticket = api
        .on_behalf_of(&cx)
        .get_ticket(&acme(), &pass.id)
        .await
        .unwrap();
    assert_eq!(ticket.available, 5);

    // A malformed key is a 400.
    let token = chassis::testing::TestIssuer::new().user_token("alice", &["ticketing:acme:*:*"]);
    let answer = raw_http(
        server.addr,
        &format!(
            "POST {path} HTTP/1.1\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nIdempotency-Key: two words\r\n\r\n{body}"
        ),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("invalid_idempotency_key"), "{answer}");
    server.stop().await;
}

#[tokio::test]
async fn too_few_places_is_409_sold_out() {
    let dir = Data::new("sold-out");
    let server = Server::start(&dir, &[]).await;
    let api = server.client();
    let cx = alice().await;
    let calls = api.on_behalf_of(&cx);
    let pass = calls.create_ticket(&acme(), &day_pass(3)).await.unwrap();
    let want = |quantity| NewReservation {
        ticket_id: pass.id.clone(),
        quantity,
    };

    calls.reserve(&acme(), &want(2), "a").await.unwrap();
    let result = calls.reserve(&acme(), &want(2), "b").await;
    assert_eq!(result.as_ref().unwrap_err().reason(), Some("sold_out"));
    let (status, problem) = refusal(result);
    assert_eq!(status, 409);
    assert_eq!(problem["available"], 1);
    assert_eq!(problem["correlation_id"], cx.correlation().id().as_str());
    // The refused key was not used up: it reserves once places are free.
    calls.reserve(&acme(), &want(1), "c").await.unwrap();
    assert_eq!(
        calls.get_ticket(&acme(), &pass.id).await.unwrap().available,
        0
    );
    assert_eq!(refusal(calls.reserve(&acme(), &want(1), "d").await).0, 409);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn capacity_is_never_oversold_under_concurrency() {
    let dir = Data::new("oversell");
    let server = Server::start(&dir, &[]).await;
    let api = server.client();
    let cx = alice().await;
    let pass = api
        .on_behalf_of(&cx)
        .create_ticket(&acme(), &day_pass(100))
        .await
        .unwrap();
    api.on_behalf_of(&cx)
        .reserve(
            &acme(),
            &NewReservation {
                ticket_id: pass.id.clone(),
                quantity: 90,
            },
            "bulk",
        )
        .await
        .unwrap();

    // 50 buyers at once for the last 10 places.
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(50));
    let buyers: Vec<_> = (0..50)
        .map(|i| {
            let (api, cx, start) = (api.clone(), cx.clone(), start.clone());
            let one = NewReservation {
                ticket_id: pass.id.clone(),
                quantity: 1,
            };
            tokio::spawn(async move {
                start.wait().await;
                api.on_behalf_of(&cx)
                    .reserve(&acme(), &one, &format!("buyer-{i}"))
                    .await
            })
        })
        .collect();
    let (mut held, mut sold_out) = (BTreeSet::new(), 0);
    for buyer in buyers {
        match buyer.await.unwrap() {
            Ok(r) => {
                assert_eq!(r.status, ReservationStatus::Held);
                held.insert(r.id);
            }
            Err(e) if e.reason() == Some("sold_out") => sold_out += 1,
            Err(e) => panic!("neither a reservation nor sold out: {e:?}"),
        }
    }
    assert_eq!((held.len(), sold_out), (10, 40));
    let ticket = api
        .on_behalf_of(&cx)
        .get_ticket(&acme(), &pass.id)
        .await
        .unwrap();
    assert_eq!((ticket.capacity, ticket.available), (100, 0));
    server.stop().await;
}

/// Two instances of the service on one database (the same SQLite file, or
/// the same Postgres database): what replicas behind a load balancer are.
async fn two_instances(dir: &Data) -> [Server; 2] {
    let first = Server::start(dir, &[]).await;
    let second = Server::start(dir, &[]).await;
    [first, second]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_on_one_database_never_oversell() {
    let dir = Data::new("replicas-oversell");
    let servers = two_instances(&dir).await;
    let cx = alice().await;
    let pass = servers[0]
        .client()
        .on_behalf_of(&cx)
        .create_ticket(&acme(), &day_pass(12))
        .await
        .unwrap();
    // Two places confirmed, so that confirmed and held places both count.
    let early = servers[1]
        .client()
        .on_behalf_of(&cx)
        .reserve(
            &acme(),
            &NewReservation {
                ticket_id: pass.id.clone(),
                quantity: 2,
            },
            "early",
        )
        .await
        .unwrap();
    servers[0]
        .client()
        .on_behalf_of(&cx)
        .confirm(&acme(), &early.id)
        .await
        .unwrap();

    // 40 buyers at once for the last 10 places, half through each instance.
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(40));
    let buyers: Vec<_> = (0..40)
        .map(|i| {
            let (api, cx, start) = (servers[i % 2].client(), cx.clone(), start.clone());
            let one = NewReservation {
                ticket_id: pass.id.clone(),
                quantity: 1,
            };
            tokio::spawn(async move {
                start.wait().await;
                api.on_behalf_of(&cx)
                    .reserve(&acme(), &one, &format!("buyer-{i}"))
                    .await
            })
        })
        .collect();
    let (mut held, mut sold_out) = (BTreeSet::new(), 0);
    for buyer in buyers {
        match buyer.await.unwrap() {
            Ok(r) => {
                assert_eq!(r.status, ReservationStatus::Held);
                held.insert(r.id);
            }
            Err(e) if e.reason() == Some("sold_out") => sold_out += 1,
            Err(e) => panic!("neither a reservation nor sold out: {e:?}"),
        }
    }
    assert_eq!((held.len(), sold_out), (10, 30));
    // Both instances count the same: held and confirmed fill the capacity
    // exactly.
    for server in &servers {
        let ticket = server
            .client()
            .on_behalf_of(&cx)
            .get_ticket(&acme(), &pass.id)
            .await
            .unwrap();
        assert_eq!((ticket.capacity, ticket.available), (12, 0));
    }
    // A release on one instance frees a place for a buyer on the other,
    // once.
    let freed = held.iter().next().unwrap().clone();
    servers[1]
        .client()
        .on_behalf_of(&cx)
        .release(&acme(), &freed)
        .await
        .unwrap();
    let one = NewReservation {
        ticket_id: pass.id.clone(),
        quantity: 1,
    };
    let late: Vec<_> = (0..6)
        .map(|i| {
            let (api, cx, one) = (servers[i % 2].client(), cx.clone(), one.clone());
            tokio::spawn(async move {
                api.on_behalf_of(&cx)
                    .reserve(&acme(), &one, &format!("late-{i}"))
                    .await
            })
        })
        .collect();
    let mut won = 0;
    for buyer in late {
        match buyer.await.unwrap() {
            Ok(_) => won += 1,
            Err(e) => assert_eq!(e.reason(), Some("sold_out"), "{e:?}"),
        }
    }
    assert_eq!(won, 1);
    for server in servers {
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_idempotency_key_on_two_instances_at_once_makes_one_reservation() {
    let dir = Data::new("replicas-idempotency");
    let servers = two_instances(&dir).await;
    let cx = alice().await;
    let pass = servers[0]
        .client()
        .on_behalf_of(&cx)
        .create_ticket(&acme(), &day_pass(100))
        .await
        .unwrap();
    // Each key sent to both instances at the same moment, 10 keys over.
    let path = "/ticketing/v1/acme/reservations";
    let body = reservation_body(&pass.id, 2);
    for round in 0..10 {
        let key = format!("twice-{round}");
        let (a, b) = tokio::join!(
            post_json(&servers[0], &cx, path, &body, Some(&key)),
            post_json(&servers[1], &cx, path, &body, Some(&key)),
        );
        let mut answers: Vec<(u16, Value)> = [a, b]
            .into_iter()
            .map(|res| {
                let res = res.unwrap();
                (res.status().as_u16(), res.json().unwrap())
            })
            .collect();
        answers.sort_by_key(|(status, _)| *status);
        // One made it, the other got it back.
        assert_eq!((answers[0].0, answers[1].0), (200, 201), "{answers:?}");
        assert_eq!(answers[0].1, answers[1].1, "the same reservation");
    }
    // One key for two different requests (two tickets) at once: they lock
    // different rows, so on Postgres both may reach the insert; the unique
    // key lets one in and the other is told the key was used for another
    // request, never a 409 or a 500.
    let other = servers[1]
        .client()
        .on_behalf_of(&cx)
        .create_ticket(&acme(), &day_pass(100))
        .await
        .unwrap();
    let other_body = reservation_body(&other.id, 2);
    for round in 0..10 {
        let key = format!("mixed-{round}");
        let (a, b) = tokio::join!(
            post_json(&servers[0], &cx, path, &body, Some(&key)),
            post_json(&servers[1], &cx, path, &other_body, Some(&key)),
        );
        let won = [&a, &b].iter().filter(|r| r.is_ok()).count();
        assert_eq!(won, 1, "round {round}: {a:?} {b:?}");
        let (status, problem) = refusal(if a.is_ok() { b } else { a });
        assert_eq!(
            (status, problem["reason"].as_str()),
            (422, Some("idempotency_key_reused")),
            "round {round}"
        );
    }
    // One reservation of 2 places per key: 10 keys, then 10 more.
    let calls = servers[1].client();
    let mut left = 0;
    for id in [&pass.id, &other.id] {
        left += calls
            .on_behalf_of(&cx)
            .get_ticket(&acme(), id)
            .await
            .unwrap()
            .available;
    }
    assert_eq!(left, 2 * 100 - 2 * 10 - 2 * 10);
    for server in servers {
        server.stop().await;
    }
}

#[tokio::test]
async fn expired_holds_give_their_places_back() {
    let dir = Data::new("expiry");
    let server = Server::start(&dir, &[("TICKETING_HOLD_SECS", "1")]).await;
    let api = server.client();
    let cx = alice().await;
    let calls = api.on_behalf_of(&cx);
    let pass = calls.create_ticket(&acme(), &day_pass(3)).await.unwrap();
    let all = NewReservation {
        ticket_id: pass.id.clone(),
        quantity: 3,
    };

    let held = calls.reserve(&acme(), &all, "first").await.unwrap();
    assert_eq!(
        (held.expires_at - held.created_at).whole_milliseconds(),
        1000
    );
    // Until it expires, the places are taken (unless the machine is so slow
    // that the hold is already over, in which case there is nothing to see).
    let taken = calls.reserve(&acme(), &all, "too-soon").await;
    if time::OffsetDateTime::now_utc() < held.expires_at {
        assert_eq!(taken.unwrap_err().reason(), Some("sold_out"));
    }

    let id = &pass.id;
    eventually("the hold to expire", || async move {
        calls.get_ticket(&acme(), id).await.unwrap().available == 3
    })
    .await;
    let expired = calls.get_reservation(&acme(), &held.id).await.unwrap();
    assert_eq!(expired.status, ReservationStatus::Expired);
    let result = calls.confirm(&acme(), &held.id).await;
    assert_eq!(
        result.as_ref().unwrap_err().reason(),
        Some("reservation_expired")
    );
    assert_eq!(refusal(result).0, 409);
    // Releasing it is a success: its places are already back.
    assert_eq!(
        calls.release(&acme(), &held.id).await.unwrap().status,
        ReservationStatus::Expired
    );
    // Someone else gets the places, and can keep them.
    let again = calls.reserve(&acme(), &all, "second").await.unwrap();
    assert_eq!(
        calls.confirm(&acme(), &again.id).await.unwrap().status,
        ReservationStatus::Confirmed
    );

    // The expiry task marks stored holds expired, and counts them.
    let downstream = server.downstream();
    eventually("the expiry task to run", || async move {
        let res = downstream
            .anonymous(&CallContext::background())
            .get("/metrics")
            .send()
            .await
            .unwrap();
        String::from_utf8_lossy(res.body()).lines().any(|l| {
            l.strip_prefix("ticketing_holds_expired_total")
                .and_then(|rest| rest.split_whitespace().last())
                .and_then(|n| n.parse::<f64>().ok())
                .is_some_and(|n| n >= 1.0)
        })
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn data_survives_a_restart() {
    let dir = Data::new("restart");
    let cx = alice().await;
    let server = Server::start(&dir, &[]).await;
    let api = server.client();
    let pass = api
        .on_behalf_of(&cx)
        .create_ticket(&acme(), &day_pass(10))
        .await
        .unwrap();
    let want = NewReservation {
        ticket_id: pass.id.clone(),
        quantity: 4,
    };
    let sold = api
        .on_behalf_of(&cx)
        .reserve(&acme(), &want, "order-7")
        .await
        .unwrap();
    let sold = api
        .on_behalf_of(&cx)
        .confirm(&acme(), &sold.id)
        .await
        .unwrap();
    server.stop().await;

    let server = Server::start(&dir, &[]).await;
    let api = server.client();
    let calls = api.on_behalf_of(&cx);
    let ticket = calls.get_ticket(&acme(), &pass.id).await.unwrap();
    assert_eq!(ticket.available, 6);
    assert_eq!(
        Ticket {
            available: 10,
            ..ticket
        },
        pass
    );
    assert_eq!(
        calls.get_reservation(&acme(), &sold.id).await.unwrap(),
        sold
    );
    // The idempotency key still replays after the restart.
    assert_eq!(
        calls.reserve(&acme(), &want, "order-7").await.unwrap(),
        sold
    );
    server.stop().await;
}

/// A database made by the first schema, with places already confirmed,
/// upgraded at start-up: the confirmed places are counted on the ticket,
/// so none of them is sold again.
#[tokio::test]
async fn places_confirmed_before_the_confirmed_count_still_count() {
    use chassis::db::{Database, Migrations};
    use sqlx::migrate::Migrator;

    let dir = Data::new("upgrade");
    let first = |engine: &str| {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("migrations")
            .join(engine);
        async move {
            let mut migrator = Migrator::new(path).await.unwrap();
            migrator.migrations = migrator.migrations[..1].to_vec().into();
            migrator
        }
    };
    let (sqlite, postgres) = (first("sqlite").await, first("postgres").await);
    let settings = support::settings(&dir, &[]);
    let db = Database::open_migrated(&settings.db, Migrations::new(&sqlite).postgres(&postgres))
        .await
        .unwrap();
    let mut tx = db.begin_write().await.unwrap();
    sqlx::query(
        "INSERT INTO tickets (id, account, name, price_minor, currency, capacity, valid_from, valid_until, created_at)
         VALUES ('tkt_old', 'acme', 'Day pass', 100, 'EUR', 5, '2026-01-01', '2099-12-31', '2026-12-01T09:00:00.000Z')",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    for (id, quantity, status) in [
        ("rsv_a", 2, "confirmed"),
        ("rsv_b", 1, "confirmed"),
        ("rsv_c", 1, "released"),
    ] {
        sqlx::query(
            "INSERT INTO reservations (id, account, ticket_id, quantity, status, expires_at, created_at)
             VALUES ($1, 'acme', 'tkt_old', $2, $3, '2026-12-01T09:15:00.000Z', '2026-12-01T09:00:00.000Z')",
        )
        .bind(id)
        .bind(quantity)
        .bind(status)
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    db.close().await;

    let server = Server::start(&dir, &[]).await;
    let api = server.client();
    let cx = alice().await;
    let calls = api.on_behalf_of(&cx);
    assert_eq!(
        calls
            .get_ticket(&acme(), "tkt_old")
            .await
            .unwrap()
            .available,
        2
    );
    let three = NewReservation {
        ticket_id: "tkt_old".to_owned(),
        quantity: 3,
    };
    let result = calls.reserve(&acme(), &three, "too-many").await;
    assert_eq!(refusal(result).0, 409);
    let two = NewReservation {
        quantity: 2,
        ..three
    };
    let held = calls.reserve(&acme(), &two, "last-two").await.unwrap();
    calls.confirm(&acme(), &held.id).await.unwrap();
    assert_eq!(
        calls
            .get_ticket(&acme(), "tkt_old")
            .await
            .unwrap()
            .available,
        0
    );
    server.stop().await;
}
