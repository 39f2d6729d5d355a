//! orders against the real system: auth issues the tokens, ticketing holds
//! the capacity, mail sends the confirmations, each on its own socket and
//! database.

mod support;

use std::time::Duration;

use chassis::circuit_breaker::State as BreakerState;
use serde_json::json;
use support::{Answer, System, eventually, login, send};

async fn product(sys: &System, token: &str, capacity: u32) -> String {
    support::product(sys, token, "acme", capacity).await
}

async fn available(sys: &System, token: &str, ticket: &str) -> u64 {
    let a = send(
        "GET",
        &format!("{}/ticketing/v1/acme/tickets/{ticket}", sys.ticketing.url()),
        &[("authorization", &format!("Bearer {token}"))],
        "",
    )
    .await;
    a.body["available"].as_u64().unwrap()
}

fn order(ticket: &str, quantity: u32) -> String {
    json!({"ticket_id": ticket, "quantity": quantity, "email": "alice@example.com"}).to_string()
}

async fn place(sys: &System, token: &str, account: &str, key: Option<&str>, body: &str) -> Answer {
    let auth = format!("Bearer {token}");
    let mut headers = vec![
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    if let Some(k) = key {
        headers.push(("idempotency-key", k));
    }
    send(
        "POST",
        &format!("{}/orders/v1/{account}/orders", sys.orders.url()),
        &headers,
        body,
    )
    .await
}

async fn get_order(sys: &System, token: &str, id: &str) -> Answer {
    send(
        "GET",
        &format!("{}/orders/v1/acme/orders/{id}", sys.orders.url()),
        &[("authorization", &format!("Bearer {token}"))],
        "",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_is_placed_confirmed_and_mailed_once_and_replayed() {
    let sys = System::start("journey", &[]).await;
    let alice = login(&sys.auth.url(), "alice").await;
    let ticket = product(&sys, &alice, 10).await;

    let first = place(&sys, &alice, "acme", Some("k-1"), &order(&ticket, 2)).await;
    assert_eq!(first.status, 201, "{:?}", first.body);
    let id = first.body["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("ord_"));
    assert_eq!(first.body["status"], "placed");
    assert_eq!(
        first.headers["location"].to_str().unwrap(),
        format!("/orders/v1/acme/orders/{id}")
    );
    assert!(first.headers.get("x-correlation-id").is_some());

    // The relay confirms the reservation and mail sends one confirmation.
    eventually("the order confirmed", || async {
        get_order(&sys, &alice, &id).await.body["status"] == "confirmed"
    })
    .await;
    eventually("the confirmation mail", || async {
        sys.mails().iter().any(|m| m.contains(&id))
    })
    .await;
    assert_eq!(available(&sys, &alice, &ticket).await, 8);

    // The same key and body: the stored answer again, nothing new.
    let again = place(&sys, &alice, "acme", Some("k-1"), &order(&ticket, 2)).await;
    assert_eq!(again.status, 201);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(again.body, first.body);

    // The same key for another request.
    let other = place(&sys, &alice, "acme", Some("k-1"), &order(&ticket, 3)).await;
    assert_eq!(other.status, 422, "{:?}", other.body);
    assert_eq!(other.body["reason"], "idempotency_key_reused");

    // Keys are per account and caller: bob's k-1 in globex is his own.
    let bob = login(&sys.auth.url(), "bob").await;
    let bobs = place(&sys, &bob, "globex", Some("k-1"), &order("tkt_nope", 1)).await;
    assert_eq!(
        bobs.status, 422,
        "bob's order for an unknown ticket: {:?}",
        bobs.body
    );
    assert_ne!(bobs.body, first.body);

    // Bob may not read acme's orders.
    let denied = get_order(&sys, &bob, &id).await;
    assert_eq!(denied.status, 403);

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sys.mails().iter().filter(|m| m.contains(&id)).count(), 1);
    assert_eq!(sys.count("SELECT COUNT(*) FROM orders").await, 1);
    assert_eq!(sys.count("SELECT COUNT(*) FROM outbox").await, 2);
    assert_eq!(
        sys.count("SELECT COUNT(*) FROM outbox WHERE delivered_at IS NULL")
            .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_keys_and_invalid_orders_are_refused_and_not_stored() {
    let sys = System::start("refusals", &[]).await;
    let alice = login(&sys.auth.url(), "alice").await;
    let ticket = product(&sys, &alice, 10).await;

    let missing = place(&sys, &alice, "acme", None, &order(&ticket, 1)).await;
    assert_eq!(missing.status, 400);
    assert!(missing.body["correlation_id"].is_string());
    let bad = place(&sys, &alice, "acme", Some("a b"), &order(&ticket, 1)).await;
    assert_eq!(bad.status, 400);

    let invalid = place(
        &sys,
        &alice,
        "acme",
        Some("k-2"),
        &json!({"ticket_id": ticket, "quantity": 0, "email": "not-an-address"}).to_string(),
    )
    .await;
    assert_eq!(invalid.status, 422);
    let fields: Vec<&str> = invalid.body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["pointer"].as_str().unwrap().trim_start_matches("#/"))
        .collect();
    assert_eq!(fields, ["quantity", "email"]);
    let garbage = place(&sys, &alice, "acme", Some("k-2"), "{not json").await;
    assert_eq!(garbage.status, 400);

    // Validation failures are not stored: the key is still free.
    let ok = place(&sys, &alice, "acme", Some("k-2"), &order(&ticket, 1)).await;
    assert_eq!(ok.status, 201, "{:?}", ok.body);

    // An unknown ticket is a final answer, stored and replayed.
    let unknown = place(&sys, &alice, "acme", Some("k-3"), &order("tkt_unknown", 1)).await;
    assert_eq!(unknown.status, 422, "{:?}", unknown.body);
    let replayed = place(&sys, &alice, "acme", Some("k-3"), &order("tkt_unknown", 1)).await;
    assert_eq!(replayed.status, 422);
    assert_eq!(replayed.headers["idempotent-replayed"], "true");
    assert_eq!(sys.count("SELECT COUNT(*) FROM orders").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_with_one_key_make_one_order() {
    let sys = System::start("same-key", &[]).await;
    let alice = login(&sys.auth.url(), "alice").await;
    let ticket = product(&sys, &alice, 100).await;
    let body = order(&ticket, 1);
    let answers = futures_join(20, |_| place(&sys, &alice, "acme", Some("same"), &body)).await;
    let created: Vec<&Answer> = answers.iter().filter(|a| a.status == 201).collect();
    let ids: std::collections::HashSet<&str> = created
        .iter()
        .map(|a| a.body["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 1, "one order id in all 201s");
    for a in &answers {
        assert!(
            a.status == 201 || (a.status == 409 && a.body["reason"] == "idempotency_key_in_use"),
            "{} {:?}",
            a.status,
            a.body
        );
    }
    assert_eq!(sys.count("SELECT COUNT(*) FROM orders").await, 1);
    assert_eq!(available(&sys, &alice, &ticket).await, 99);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_tickets_are_never_oversold() {
    let sys = System::start("oversell", &[]).await;
    let alice = login(&sys.auth.url(), "alice").await;
    let ticket = product(&sys, &alice, 10).await;
    let keys: Vec<String> = (0..50).map(|i| format!("buyer-{i}")).collect();
    let body = order(&ticket, 1);
    let answers = futures_join(50, |i| place(&sys, &alice, "acme", Some(&keys[i]), &body)).await;
    let created = answers.iter().filter(|a| a.status == 201).count();
    let sold_out = answers
        .iter()
        .filter(|a| a.status == 409 && a.body["reason"] == "sold_out")
        .count();
    assert_eq!(
        (created, sold_out),
        (10, 40),
        "{:?}",
        answers.iter().map(|a| a.status).collect::<Vec<_>>()
    );
    assert_eq!(sys.count("SELECT COUNT(*) FROM orders").await, 10);
    assert_eq!(available(&sys, &alice, &ticket).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticketing_down_fails_fast_leaves_nothing_and_recovery_closes_the_breaker() {
    let mut sys = System::start(
        "ticketing-down",
        &[
            ("CHASSIS_DOWNSTREAM_TICKETING_RETRY_MAX_ATTEMPTS", "1"),
            ("CHASSIS_DOWNSTREAM_TICKETING_BREAKER_WINDOW", "4"),
            ("CHASSIS_DOWNSTREAM_TICKETING_BREAKER_MINIMUM_CALLS", "2"),
            ("CHASSIS_DOWNSTREAM_TICKETING_BREAKER_WAIT_OPEN_MS", "500"),
        ],
    )
    .await;
    let alice = login(&sys.auth.url(), "alice").await;
    let ticket = product(&sys, &alice, 10).await;
    sys.stop_ticketing().await;

    for i in 0..4 {
        let a = place(
            &sys,
            &alice,
            "acme",
            Some(&format!("down-{i}")),
            &order(&ticket, 1),
        )
        .await;
        assert_eq!(a.status, 503, "{:?}", a.body);
        assert!(a.headers.contains_key("retry-after"));
    }
    assert_eq!(sys.to_ticketing.breaker().state(), BreakerState::Open);
    assert_eq!(sys.count("SELECT COUNT(*) FROM orders").await, 0);
    assert_eq!(sys.count("SELECT COUNT(*) FROM idempotency_keys").await, 0);

    sys.restart_ticketing().await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    // The same key works now: nothing was kept from the failed attempt.
    let a = place(&sys, &alice, "acme", Some("down-0"), &order(&ticket, 1)).await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    assert_eq!(sys.to_ticketing.breaker().state(), BreakerState::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mail_down_orders_are_accepted_and_every_confirmation_arrives_once() {
    let mut sys = System::start("mail-down", &[]).await;
    let alice = login(&sys.auth.url(), "alice").await;
    let ticket = product(&sys, &alice, 50).await;
    sys.stop_mail().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let a = place(
            &sys,
            &alice,
            "acme",
            Some(&format!("m-{i}")),
            &order(&ticket, 1),
        )
        .await;
        assert_eq!(a.status, 201, "{:?}", a.body);
        ids.push(a.body["id"].as_str().unwrap().to_owned());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(sys.mails().is_empty());
    assert!(
        sys.count(
            "SELECT COUNT(*) FROM outbox WHERE kind = 'order.placed' AND delivered_at IS NULL"
        )
        .await
            == 5
    );

    sys.restart_mail().await;
    eventually("every confirmation", || async {
        let mails = sys.mails();
        ids.iter()
            .all(|id| mails.iter().any(|m| m.contains(id.as_str())))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mails = sys.mails();
    for id in &ids {
        assert_eq!(
            mails.iter().filter(|m| m.contains(id.as_str())).count(),
            1,
            "{id}"
        );
    }
    assert_eq!(
        sys.count("SELECT COUNT(*) FROM outbox WHERE delivered_at IS NULL")
            .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_survive_a_restart() {
    let mut sys = System::start("restart", &[]).await;
    let alice = login(&sys.auth.url(), "alice").await;
    let ticket = product(&sys, &alice, 10).await;
    let first = place(&sys, &alice, "acme", Some("r-1"), &order(&ticket, 1)).await;
    assert_eq!(first.status, 201);
    sys.restart_orders().await;
    let again = place(&sys, &alice, "acme", Some("r-1"), &order(&ticket, 1)).await;
    assert_eq!(again.status, 201);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(again.body, first.body);
    assert_eq!(sys.count("SELECT COUNT(*) FROM orders").await, 1);
}

/// Runs `n` requests at once and collects their answers in order.
async fn futures_join<F, Fut>(n: usize, f: F) -> Vec<Answer>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Answer>,
{
    futures::future::join_all((0..n).map(f)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_correlation_id_travels_with_the_order_to_the_mail() {
    let sys = System::start("correlation", &[]).await;
    let alice = login(&sys.auth.url(), "alice").await;
    let ticket = product(&sys, &alice, 10).await;
    let a = send(
        "POST",
        &format!("{}/orders/v1/acme/orders", sys.orders.url()),
        &[
            ("authorization", &format!("Bearer {alice}")),
            ("content-type", "application/json"),
            ("idempotency-key", "c-1"),
            ("x-correlation-id", "journey-o16"),
        ],
        &order(&ticket, 1),
    )
    .await;
    assert_eq!(a.status, 201);
    assert_eq!(a.headers["x-correlation-id"], "journey-o16");
    assert_eq!(
        sys.count("SELECT COUNT(*) FROM outbox WHERE correlation_id = 'journey-o16'")
            .await,
        2
    );
    let id = a.body["id"].as_str().unwrap().to_owned();
    eventually("the mail", || async {
        sys.mails().iter().any(|m| m.contains(&id))
    })
    .await;
    let mail = sys.mails().into_iter().find(|m| m.contains(&id)).unwrap();
    assert!(mail.contains("X-Correlation-ID: journey-o16"), "{mail}");
    // And the audit record of the call that placed it.
    let audit = sys.dir.join("orders-audit.log");
    eventually("the audit record", || async {
        std::fs::read_to_string(&audit).is_ok_and(|log| {
            log.lines().any(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
                v["correlation_id"] == "journey-o16" && v["decision"] == "allow"
            })
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_event_is_parked_and_the_others_flow() {
    let sys = System::start("parking", &[("ORDERS_RELAY_MAX_ATTEMPTS", "2")]).await;
    let alice = login(&sys.auth.url(), "alice").await;
    let ticket = product(&sys, &alice, 10).await;
    // An address orders lets through but mail refuses: a poison event.
    let poison = json!({"ticket_id": ticket, "quantity": 1, "email": "x@a..b"}).to_string();
    let bad = place(&sys, &alice, "acme", Some("p-1"), &poison).await;
    assert_eq!(bad.status, 201, "{:?}", bad.body);
    let good = place(&sys, &alice, "acme", Some("p-2"), &order(&ticket, 1)).await;
    let good_id = good.body["id"].as_str().unwrap().to_owned();
    let bad_id = bad.body["id"].as_str().unwrap().to_owned();

    eventually("the poison event parked", || async {
        sys.count("SELECT COUNT(*) FROM outbox WHERE parked_at IS NOT NULL")
            .await
            == 1
    })
    .await;
    eventually("the other order mailed", || async {
        sys.mails().iter().any(|m| m.contains(&good_id))
    })
    .await;
    eventually("the order marked for attention", || async {
        get_order(&sys, &alice, &bad_id).await.body["status"] == "attention"
    })
    .await;
    eventually("readiness reporting it", || async {
        let r = send(
            "GET",
            &format!("{}/health/ready", sys.orders.url()),
            &[],
            "",
        )
        .await;
        r.status == 200 && r.body["checks"]["outbox-parked"]["status"] == "down"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mail_down_the_relay_stops_calling_it() {
    let mut sys = System::start(
        "no-hammering",
        &[
            ("CHASSIS_DOWNSTREAM_MAIL_BREAKER_MINIMUM_CALLS", "2"),
            ("CHASSIS_DOWNSTREAM_MAIL_BREAKER_WINDOW", "4"),
            ("CHASSIS_DOWNSTREAM_MAIL_BREAKER_WAIT_OPEN_MS", "60000"),
            ("CHASSIS_DOWNSTREAM_MAIL_RETRY_MAX_ATTEMPTS", "1"),
            // One event at a time, so that the calls made before the
            // breaker opens are counted exactly: with N in flight, up to N
            // more start before the failures that open it come back.
            ("ORDERS_RELAY_CONCURRENCY", "1"),
        ],
    )
    .await;
    let alice = login(&sys.auth.url(), "alice").await;
    let ticket = product(&sys, &alice, 50).await;
    sys.stop_mail().await;
    for i in 0..6 {
        let a = place(
            &sys,
            &alice,
            "acme",
            Some(&format!("h-{i}")),
            &order(&ticket, 1),
        )
        .await;
        assert_eq!(a.status, 201);
    }
    eventually("the mail breaker open", || async {
        sys.to_mail.breaker().state() == BreakerState::Open
    })
    .await;
    let attempts = || {
        sys.count("SELECT CAST(COALESCE(SUM(attempts), 0) AS BIGINT) FROM outbox WHERE kind = 'order.placed'")
    };
    let before = attempts().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // While open, due events are refused by the breaker: no call, no attempt.
    assert_eq!(attempts().await, before, "no call reached the closed port");
    assert!(before <= 4, "{before} attempts before the breaker opened");
    assert!(
        sys.count("SELECT COUNT(*) FROM outbox WHERE last_error LIKE '%circuit open%'")
            .await
            > 0
    );
    // Orders keep being accepted meanwhile.
    let a = place(&sys, &alice, "acme", Some("h-late"), &order(&ticket, 1)).await;
    assert_eq!(a.status, 201);
}

/// O14: the database cannot be written (another process holds its write
/// lock). Orders are refused with 503 once the busy timeout runs out, and
/// nothing is half-made; liveness stays up while readiness goes down; once
/// the lock is gone the same key works and readiness comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_database_refuses_orders_and_loses_nothing() {
    use sqlx::{ConnectOptions, Connection, sqlite::SqliteConnectOptions};

    // SQLite's own: the lock of the file, held by another process. Postgres
    // locks rows and tables, and has no such lock to hold.
    if chassis::testing::test_backend() != chassis::db::Backend::Sqlite {
        return;
    }
    let sys = System::start("db-locked", &[]).await;
    let alice = login(&sys.auth.url(), "alice").await;
    let ticket = product(&sys, &alice, 10).await;

    let mut blocker = SqliteConnectOptions::new()
        .filename(sys.dir.join("orders").join("orders.db"))
        .connect()
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut blocker)
        .await
        .unwrap();

    let refused = place(&sys, &alice, "acme", Some("locked-1"), &order(&ticket, 1)).await;
    assert_eq!(refused.status, 503, "{:?}", refused.body);
    assert!(refused.headers.contains_key("retry-after"));
    assert!(refused.body["correlation_id"].is_string());
    let live = send("GET", &format!("{}/health/live", sys.orders.url()), &[], "").await;
    assert_eq!(live.status, 200);
    let ready = || async {
        send(
            "GET",
            &format!("{}/health/ready", sys.orders.url()),
            &[],
            "",
        )
        .await
    };
    eventually("readiness down", || async {
        let r = ready().await;
        r.status == 503 && r.body["checks"]["database-writes"]["status"] == "down"
    })
    .await;

    sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();
    blocker.close().await.unwrap();
    eventually("readiness back", || async { ready().await.status == 200 }).await;
    assert_eq!(sys.count("SELECT COUNT(*) FROM orders").await, 0);
    let placed = place(&sys, &alice, "acme", Some("locked-1"), &order(&ticket, 1)).await;
    assert_eq!(placed.status, 201, "{:?}", placed.body);
    assert_eq!(sys.count("SELECT COUNT(*) FROM orders").await, 1);
}

/// Two instances of orders on one database, as replicas behind a load
/// balancer: a key sent to both at once makes one order, and the two
/// relays between them deliver every event, each confirmation arriving
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_database_place_and_deliver_each_order_once() {
    let sys = System::start("replicas", &[]).await;
    let mut replica = sys.start_replica().await;
    let alice = login(&sys.auth.url(), "alice").await;
    let ticket = product(&sys, &alice, 100).await;
    let urls = [sys.orders.url(), replica.url()];
    let auth = format!("Bearer {alice}");
    let post = |i: usize, key: String| {
        let url = format!("{}/orders/v1/acme/orders", urls[i % 2]);
        let auth = auth.clone();
        let body = order(&ticket, 1);
        async move {
            send(
                "POST",
                &url,
                &[
                    ("authorization", auth.as_str()),
                    ("content-type", "application/json"),
                    ("idempotency-key", key.as_str()),
                ],
                &body,
            )
            .await
        }
    };

    // One key, sent to both instances at once: one order.
    let answers = futures_join(10, |i| post(i, "shared".to_owned())).await;
    let shared: std::collections::HashSet<String> = answers
        .iter()
        .filter(|a| a.status == 201)
        .map(|a| a.body["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(shared.len(), 1, "{answers:?}");
    assert!(
        answers.iter().all(|a| a.status == 201 || a.status == 409),
        "{answers:?}"
    );

    // Orders through both; both relays poll the one outbox.
    let answers = futures_join(10, |i| post(i, format!("rep-{i}"))).await;
    let mut ids: Vec<String> = answers
        .iter()
        .map(|a| {
            assert_eq!(a.status, 201, "{:?}", a.body);
            a.body["id"].as_str().unwrap().to_owned()
        })
        .collect();
    ids.extend(shared);
    eventually("every event delivered", || async {
        sys.count("SELECT COUNT(*) FROM outbox WHERE delivered_at IS NULL")
            .await
            == 0
    })
    .await;
    eventually("every confirmation mail", || async {
        let mails = sys.mails();
        ids.iter()
            .all(|id| mails.iter().any(|m| m.contains(id.as_str())))
    })
    .await;
    let mails = sys.mails();
    for id in &ids {
        assert_eq!(
            mails.iter().filter(|m| m.contains(id.as_str())).count(),
            1,
            "{id}"
        );
    }
    assert_eq!(sys.count("SELECT COUNT(*) FROM orders").await, 11);
    assert_eq!(
        sys.count("SELECT COUNT(*) FROM orders WHERE status = 'confirmed'")
            .await,
        11
    );
    // Every event delivered at its first attempt, and no lease left held.
    assert_eq!(
        sys.count("SELECT COUNT(*) FROM outbox WHERE attempts > 0 OR lease_owner IS NOT NULL")
            .await,
        0
    );
    assert_eq!(available(&sys, &alice, &ticket).await, 89);
    replica.stop().await;
}
