//! Orders serves v2 and v1 side by side on the same data, against the real
//! system: v1's driver client keeps working, every v1 answer says it is
//! deprecated (and until when, and what follows it), v2's none of it; an
//! order placed through v2 reads back through v1, and one placed through v1
//! through v2.

mod support;

use chassis::client::{CallContext, ClientError};
use orders::{
    NewOrder, OrdersClient,
    client::v2::{self, Contact, OrderLine},
};
use serde_json::json;
use support::{Answer, System, login, orders_on_behalf_of, product, send};

/// Both driver clients, and the context of calls on behalf of `token`'s
/// user.
async fn clients(sys: &System, token: &str) -> (OrdersClient, v2::OrdersClient, CallContext) {
    let (downstream, cx) = orders_on_behalf_of(sys, token).await;
    (
        OrdersClient::new(downstream.clone()),
        v2::OrdersClient::new(downstream),
        cx,
    )
}

/// A v2 order of `quantity` places of `ticket`.
fn v2_order(ticket: &str, quantity: u32) -> v2::NewOrder {
    v2::NewOrder {
        lines: vec![OrderLine {
            ticket_id: ticket.to_owned(),
            quantity,
        }],
        contact: Contact {
            email: "alice@example.com".to_owned(),
        },
    }
}

async fn call(sys: &System, method: &str, path: &str, token: Option<&str>, body: &str) -> Answer {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("authorization", a));
    }
    if method == "POST" {
        headers.push(("idempotency-key", "versions-raw-1"));
    }
    send(
        method,
        &format!("{}{path}", sys.orders.url()),
        &headers,
        body,
    )
    .await
}

/// The sunset this test gives v1 (`ORDERS_V1_SUNSET`).
const SUNSET: &str = "2027-03-31";

fn assert_deprecated(a: &Answer, what: &str) {
    assert_eq!(
        a.headers["deprecation"], "@1796083200",
        "{what}: 2026-12-01"
    );
    assert_eq!(
        a.headers["sunset"], "Wed, 31 Mar 2027 00:00:00 GMT",
        "{what}"
    );
    let links: Vec<&str> = a
        .headers
        .get_all("link")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert!(
        links.contains(
            &"<https://docs.example.com/orders/v1-to-v2>; rel=\"deprecation\", </orders/v2/openapi.json>; rel=\"successor-version\"; type=\"application/json\""
        ),
        "{what}: {links:?}"
    );
}

fn assert_current(a: &Answer, what: &str) {
    for name in ["deprecation", "sunset", "link"] {
        assert!(!a.headers.contains_key(name), "{what}: {name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_keeps_working_beside_v2_on_the_same_orders_and_says_it_is_going() {
    let sys = System::start(
        "versions",
        &[
            ("ORDERS_V1_SUNSET", SUNSET),
            (
                "ORDERS_V1_DEPRECATION_LINK",
                "https://docs.example.com/orders/v1-to-v2",
            ),
        ],
    )
    .await;
    let alice = login(&sys.auth.url(), "alice").await;
    let ticket = product(&sys, &alice, "acme", 10).await;
    let (v1_client, v2_client, cx) = clients(&sys, &alice).await;

    // v1's driver client, unchanged, against the service serving both.
    let placed_v1 = v1_client
        .on_behalf_of(&cx)
        .place(
            "acme",
            &NewOrder {
                ticket_id: ticket.clone(),
                quantity: 2,
                email: "alice@example.com".to_owned(),
            },
            "versions-v1-1",
        )
        .await
        .unwrap()
        .order;
    assert_eq!(placed_v1.quantity, 2);

    // v2's client places an order in v2's shape...
    let placed_v2 = v2_client
        .on_behalf_of(&cx)
        .place("acme", &v2_order(&ticket, 3), "versions-v2-1")
        .await
        .unwrap()
        .order;
    assert_eq!(placed_v2.lines.len(), 1);
    assert_eq!(placed_v2.contact.email, "alice@example.com");

    // ...which v1 reads back in its own, and the other way round.
    let through_v1 = v1_client
        .on_behalf_of(&cx)
        .get("acme", &placed_v2.id)
        .await
        .unwrap();
    assert_eq!(
        (through_v1.ticket_id.as_str(), through_v1.quantity),
        (ticket.as_str(), 3)
    );
    assert_eq!(through_v1.email, "alice@example.com");
    assert_eq!(through_v1.reservation_id, placed_v2.reservation_id);
    let through_v2 = v2_client
        .on_behalf_of(&cx)
        .get("acme", &placed_v1.id)
        .await
        .unwrap();
    assert_eq!(
        through_v2.lines,
        [OrderLine {
            ticket_id: ticket.clone(),
            quantity: 2
        }]
    );
    let all_v1 = v1_client.on_behalf_of(&cx).list_all("acme").await.unwrap();
    let all_v2 = v2_client
        .on_behalf_of(&cx)
        .list("acme", None)
        .await
        .unwrap()
        .items;
    let ids = |ids: Vec<&String>| ids.into_iter().cloned().collect::<Vec<_>>();
    assert_eq!(
        ids(all_v1.iter().map(|o| &o.id).collect()),
        ids(all_v2.iter().map(|o| &o.id).collect()),
        "the same orders, in the same order"
    );
    assert_eq!(all_v1.len(), 2);

    // A v1 key is not replayed in v2's shape.
    let reused = v2_client
        .on_behalf_of(&cx)
        .place("acme", &v2_order(&ticket, 2), "versions-v1-1")
        .await
        .unwrap_err();
    assert!(
        matches!(&reused, ClientError::Status { status, .. } if status.as_u16() == 422),
        "{reused:?}"
    );

    // Every v1 answer is marked, errors included; v2's are not.
    let order = format!("/orders/{{v}}/acme/orders/{}", placed_v1.id);
    for (method, path, token, status) in [
        ("GET", order.as_str(), Some(alice.as_str()), 200),
        ("GET", "/orders/{v}/acme/orders", Some(&alice), 200),
        ("GET", order.as_str(), None, 401),
        ("GET", "/orders/{v}/globex/orders", Some(&alice), 403),
        ("GET", "/orders/{v}/acme/orders/ord_nope", Some(&alice), 404),
        ("GET", "/orders/{v}/nowhere", None, 404),
        ("POST", "/orders/{v}/acme/orders", Some(&alice), 422),
        ("GET", "/orders/{v}/openapi.json", None, 200),
    ] {
        for v in ["v1", "v2"] {
            let path = path.replace("{v}", v);
            let a = call(&sys, method, &path, token, "{}").await;
            let what = format!("{method} {path}");
            assert_eq!(a.status, status, "{what}: {:?}", a.body);
            if v == "v1" {
                assert_deprecated(&a, &what);
            } else {
                assert_current(&a, &what);
            }
        }
    }

    // The documents: v1's deprecated with its sunset, v2's with lines.
    let v1_doc = call(&sys, "GET", "/orders/v1/openapi.json", None, "")
        .await
        .body;
    let v2_doc = call(&sys, "GET", "/orders/v2/openapi.json", None, "")
        .await
        .body;
    assert_eq!(
        v1_doc["paths"]["/orders/v1/{account}/orders"]["post"]["deprecated"],
        true
    );
    assert_eq!(v1_doc["info"]["x-sunset"], "2027-03-31T00:00:00.000Z");
    assert!(
        v2_doc["paths"]["/orders/v2/{account}/orders"]["post"]
            .get("deprecated")
            .is_none()
    );
    assert!(
        v2_doc["components"]["schemas"]["Order"]["properties"]["lines"].is_object(),
        "{}",
        v2_doc["components"]["schemas"]["Order"]
    );

    // /info names both, and the sunset the service was given.
    let info = call(&sys, "GET", "/info", None, "").await.body;
    assert_eq!(info["api_version"], 2);
    assert_eq!(info["api_versions"][0]["version"], 1);
    assert_eq!(
        info["api_versions"][0]["sunset_at"],
        "2027-03-31T00:00:00.000Z"
    );
    assert_eq!(info["api_versions"][1]["deprecated"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v2_order_is_checked_in_v2_terms() {
    let sys = System::start("versions-invalid", &[]).await;
    let alice = login(&sys.auth.url(), "alice").await;
    let place = |body: serde_json::Value| {
        let alice = alice.clone();
        let sys = &sys;
        async move {
            call(
                sys,
                "POST",
                "/orders/v2/acme/orders",
                Some(&alice),
                &body.to_string(),
            )
            .await
        }
    };
    let pointers = |a: &Answer| -> Vec<String> {
        assert_eq!(a.status, 422, "{:?}", a.body);
        a.body["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["pointer"].as_str().unwrap().to_owned())
            .collect()
    };
    let a =
        place(json!({"lines": [{"ticket_id": "t*", "quantity": 0}], "contact": {"email": "nope"}}))
            .await;
    let mut found = pointers(&a);
    found.sort();
    assert_eq!(
        found,
        [
            "#/contact/email",
            "#/lines/0/quantity",
            "#/lines/0/ticket_id"
        ]
    );
    let a = place(json!({"lines": [], "contact": 1})).await;
    let mut found = pointers(&a);
    found.sort();
    assert_eq!(found, ["#/contact", "#/lines"]);
    // v1's body is not v2's.
    let a = place(json!({"ticket_id": "tkt_1", "quantity": 1, "email": "a@example.com"})).await;
    let mut found = pointers(&a);
    found.sort();
    assert_eq!(found, ["#/contact", "#/lines"]);
}
