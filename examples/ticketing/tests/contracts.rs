//! Consumer-driven contracts (`chassis::testing::contract`), both ways:
//! ticketing honours the contracts its consumers committed (orders'
//! `contracts/orders-ticketing.json`), a changed document that would break
//! one is caught and named, and ticketing's own calls to mail are its
//! committed contract with mail (`contracts/ticketing-mail.json`; rewrite
//! with `CHASSIS_UPDATE_CONTRACTS=1`).

mod support;

use std::path::{Path, PathBuf};

use chassis::{
    permission::AccountId,
    testing::{
        contract::{Contract, Recorder, verify_provider},
        fetch_openapi,
    },
};
use serde_json::json;
use support::{
    Data, Server, alice, day_pass, eventually, mail::Mail, reservation, sell_out_again, settings,
};

/// Where the system's contracts are committed.
fn contracts() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../contracts")
}

#[tokio::test]
async fn ticketing_honours_every_contract_naming_it() {
    let data = Data::new("ticketing-contracts");
    let server = Server::start(&data, &[]).await;
    let checked = verify_provider(
        &format!("http://{}", server.addr),
        "ticketing",
        &contracts(),
    )
    .await;
    server.stop().await;
    assert!(checked >= 1, "orders' contract at least");
}

#[tokio::test]
async fn a_change_that_breaks_orders_is_named() {
    let data = Data::new("ticketing-contracts-broken");
    let server = Server::start(&data, &[]).await;
    let document = fetch_openapi(&format!("http://{}", server.addr), "ticketing", 1).await;
    server.stop().await;
    let orders = Contract::load(&contracts().join("orders-ticketing.json"));
    assert_eq!(orders.check(std::slice::from_ref(&document)), []);
    let reserve = "orders → ticketing: POST /ticketing/v1/{}/reservations";
    let confirm = "orders → ticketing: POST /ticketing/v1/{}/reservations/{}/confirm → 200";

    // A field orders requires is no longer required.
    let found = orders.breaches_if(&document, |d| {
        let required = d["components"]["schemas"]["Reservation"]["required"]
            .as_array_mut()
            .unwrap();
        required.retain(|f| f != "expires_at");
    });
    assert_eq!(
        found,
        [
            format!(
                "{reserve} → 201: `expires_at`, which orders requires, may be left out: the 201 answer's schema does not require it"
            ),
            format!(
                "{confirm}: `expires_at`, which orders requires, may be left out: the 200 answer's schema does not require it"
            ),
        ]
    );

    // A field orders reads changes its type.
    let found = orders.breaches_if(&document, |d| {
        d["components"]["schemas"]["Reservation"]["properties"]["quantity"] =
            json!({"type": "string"});
    });
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(
        found[0].starts_with(&format!("{reserve} → 201: `quantity`, which orders reads, no longer fits the 201 answer's schema: at /quantity: ")),
        "{found:?}"
    );

    // The confirm route renamed.
    let found = orders.breaches_if(&document, |d| {
        let paths = d["paths"].as_object_mut().unwrap();
        let item = paths
            .remove("/ticketing/v1/{account}/reservations/{id}/confirm")
            .unwrap();
        paths.insert(
            "/ticketing/v1/{account}/reservations/{id}/confirmation".to_owned(),
            item,
        );
    });
    assert_eq!(
        found,
        [format!(
            "{confirm}: the provider's document has no operation POST /ticketing/v1/{{}}/reservations/{{}}/confirm"
        )]
    );

    // Sold out answered with another status.
    let found = orders.breaches_if(&document, |d| {
        let responses = d["paths"]["/ticketing/v1/{account}/reservations"]["post"]["responses"]
            .as_object_mut()
            .unwrap();
        let conflict = responses.remove("409").unwrap();
        responses.insert("410".to_owned(), conflict);
    });
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].starts_with(&format!("{reserve} → 409: status 409, which orders handles, is not documented (documented: 200, 201, 400, ")),
        "{found:?}"
    );

    // A new required field in the request orders sends.
    let found = orders.breaches_if(&document, |d| {
        let new = &mut d["components"]["schemas"]["NewReservation"];
        new["properties"]["channel"] = json!({"type": "string"});
        new["required"]
            .as_array_mut()
            .unwrap()
            .push(json!("channel"));
    });
    assert_eq!(found.len(), 3, "each reserve interaction: {found:?}");
    assert!(
        found.iter().all(|f| f.starts_with(reserve)
            && f.contains("the request orders sends is refused")
            && f.contains("channel")),
        "{found:?}"
    );
}

#[tokio::test]
async fn ticketings_calls_to_mail_are_its_committed_contract() {
    let mail = Mail::start().await;
    let dir = Data::new("ticketing-contract-mail");
    let mut settings = settings(&dir, &[]);
    let notices = mail.notices(&["mail::send:message"]).await;
    let recorder = Recorder::new();
    assert!(notices.mail.record_into(&recorder));
    settings.sold_out = Some(notices);
    let server = Server::start_with(settings).await;
    let alice = alice().await;
    let calls = server.client();
    let acme = AccountId::parse("acme").unwrap();
    let ticket = calls
        .on_behalf_of(&alice)
        .create_ticket(&acme, &day_pass(1))
        .await
        .unwrap();
    // Sold out: a notice; sold out again after a release: mail already
    // has it.
    let held = calls
        .on_behalf_of(&alice)
        .reserve(&acme, &reservation(&ticket.id, 1), "first")
        .await
        .unwrap();
    sell_out_again(&calls, &alice, &acme, &ticket.id, &held.id).await;
    eventually("both notices asked for", || async {
        recorder.calls().len() == 2
    })
    .await;
    server.stop().await;

    let contract = Contract::from_calls("ticketing", "mail", &recorder.calls());
    contract.assert_honoured_by(&mail.url()).await;
    contract.assert_up_to_date(Path::new(&contracts()));
    mail.stop().await;
}
