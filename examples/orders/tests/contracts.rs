//! Orders' contracts with the services it calls (consumer-driven
//! contracts, `chassis::testing::contract`): orders runs against the real
//! ticketing and mail on loopback, its calls to them are recorded, and the
//! committed `contracts/orders-ticketing.json` and
//! `contracts/orders-mail.json` must say what was recorded (rewrite them
//! with `CHASSIS_UPDATE_CONTRACTS=1`). The providers' own tests check that
//! their documents honour them.

mod support;

use std::path::PathBuf;

use chassis::testing::contract::{Contract, Recorder};
use serde_json::json;
use support::{System, eventually, login, send};

/// Where the system's contracts are committed.
fn contracts() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../contracts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_calls_to_ticketing_and_mail_are_its_committed_contracts() {
    let sys = System::start("contracts", &[]).await;
    let (to_ticketing, to_mail) = (Recorder::new(), Recorder::new());
    assert!(sys.to_ticketing.record_into(&to_ticketing));
    assert!(sys.to_mail.record_into(&to_mail));
    let alice = login(&sys.auth.url(), "alice").await;
    let bearer = format!("Bearer {alice}");
    let headers = |key: &'static str| {
        [
            ("authorization", bearer.clone()),
            ("content-type", "application/json".to_owned()),
            ("idempotency-key", key.to_owned()),
        ]
    };
    let call = |method: &'static str, url: String, key: &'static str, body: serde_json::Value| {
        let headers = headers(key);
        async move {
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            send(method, &url, &headers, &body.to_string()).await
        }
    };
    let ticket = call(
        "POST",
        format!("{}/ticketing/v1/acme/tickets", sys.ticketing.url()),
        "product",
        json!({
            "name": "Day pass", "price_minor": 4500, "currency": "EUR", "capacity": 2,
            "valid_from": "2026-12-01", "valid_until": "2027-04-30",
        }),
    )
    .await;
    assert_eq!(ticket.status, 201, "{:?}", ticket.body);
    let ticket = ticket.body["id"].as_str().unwrap().to_owned();
    let orders = format!("{}/orders/v1/acme/orders", sys.orders.url());
    let order = |quantity: u32, ticket: &str| json!({"ticket_id": ticket, "quantity": quantity, "email": "alice@example.com"});

    // Every way orders' calls end: placed (reserve, then the relay's
    // confirm and mail), sold out, no such ticket.
    let placed = call("POST", orders.clone(), "k-1", order(2, &ticket)).await;
    assert_eq!(placed.status, 201, "{:?}", placed.body);
    let id = placed.body["id"].as_str().unwrap().to_owned();
    eventually("the confirmation mail", || async {
        sys.mails().iter().any(|m| m.contains(&id))
    })
    .await;
    eventually("the reservation confirmed", || async {
        to_ticketing
            .calls()
            .iter()
            .any(|c| c.template.ends_with("/confirm") && c.status == 200)
    })
    .await;
    let sold_out = call("POST", orders.clone(), "k-2", order(1, &ticket)).await;
    assert_eq!(sold_out.status, 409, "{:?}", sold_out.body);
    let unknown = call(
        "POST",
        orders,
        "k-3",
        order(1, "tkt_0190000000007000800000000000000"),
    )
    .await;
    assert_eq!(unknown.status, 422, "{:?}", unknown.body);

    let dir = contracts();
    for (provider, recorder, url) in [
        ("ticketing", &to_ticketing, sys.ticketing.url()),
        ("mail", &to_mail, sys.mail.url()),
    ] {
        let contract = Contract::from_calls("orders", provider, &recorder.calls());
        assert!(!contract.interactions.is_empty(), "orders calls {provider}");
        contract.assert_honoured_by(&url).await;
        contract.assert_up_to_date(&dir);
    }
}
