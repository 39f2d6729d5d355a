//! The order list, page by page, against the real system on the run's
//! engine (`CHASSIS_TEST_BACKEND`): every order reachable by following
//! `next`, none twice, newest first, while other orders are being placed;
//! and the refusals of a bad `limit` or `cursor`, including another
//! account's cursor.

mod support;

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use chassis::{client::CallContext, page::Page};
use orders::{NewOrder, Order, OrdersClient};
use serde_json::Value;
use support::{Answer, System, eventually, login, product, send};

/// The orders client, and the context of calls on behalf of `user`.
async fn client(sys: &System, user: &str) -> (OrdersClient, CallContext) {
    let token = login(&sys.auth.url(), user).await;
    let (downstream, cx) = support::orders_on_behalf_of(sys, &token).await;
    (OrdersClient::new(downstream), cx)
}

/// Places one order of one place of `ticket`, with a fresh key.
async fn place(client: &OrdersClient, cx: &CallContext, account: &str, ticket: &str) -> Order {
    let new = NewOrder {
        ticket_id: ticket.to_owned(),
        quantity: 1,
        email: "alice@example.com".to_owned(),
    };
    let key = chassis::id::prefixed("key");
    client
        .on_behalf_of(cx)
        .place(account, &new, &key)
        .await
        .unwrap()
        .order
}

/// `GET path` with `token`, raw.
async fn get(sys: &System, token: &str, path: &str) -> Answer {
    send(
        "GET",
        &format!("{}{path}", sys.orders.url()),
        &[("authorization", &format!("Bearer {token}"))],
        "",
    )
    .await
}

/// The sort key of the list: newest first, by creation time then id.
fn key(o: &Order) -> (&str, &str) {
    (o.created_at.as_str(), o.id.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_order_is_reached_once_newest_first_while_others_are_placed() {
    let sys = System::start("pages", &[]).await;
    let alice_token = login(&sys.auth.url(), "alice").await;
    let ticket = product(&sys, &alice_token, "acme", 1000).await;
    let (orders, cx) = client(&sys, "alice").await;
    let mut before: HashSet<String> = HashSet::new();
    for _ in 0..250 {
        before.insert(place(&orders, &cx, "acme", &ticket).await.id);
    }

    // Orders keep being placed while the pages are read; each page is read
    // only after at least one more was placed since the one before, so the
    // reads and the inserts interleave.
    let placed = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let placing = {
        let (orders, cx, ticket) = (orders.clone(), cx.clone(), ticket.clone());
        let (placed, stop) = (placed.clone(), stop.clone());
        tokio::spawn(async move {
            let mut during = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                during.push(place(&orders, &cx, "acme", &ticket).await.id);
                placed.fetch_add(1, Ordering::SeqCst);
            }
            during
        })
    };

    let mut seen: Vec<Order> = Vec::new();
    let mut sizes = Vec::new();
    let mut pages = orders.on_behalf_of(&cx).pages("acme", Some(40)).unwrap();
    loop {
        let n = placed.load(Ordering::SeqCst);
        eventually("an order placed between two pages", || async {
            placed.load(Ordering::SeqCst) > n
        })
        .await;
        let Some(page) = pages.next().await.unwrap() else {
            break;
        };
        assert!(page.items.len() <= 40);
        sizes.push(page.items.len());
        seen.extend(page.items);
    }
    stop.store(true, Ordering::SeqCst);
    let during: HashSet<String> = placing.await.unwrap().into_iter().collect();
    assert!(sizes.len() >= 7, "{sizes:?}");

    // None twice; every order placed before the reading began, exactly
    // once; nothing but those and orders placed meanwhile; newest first.
    let ids: Vec<&str> = seen.iter().map(|o| o.id.as_str()).collect();
    let unique: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "an order was listed twice");
    for id in &before {
        assert!(unique.contains(id.as_str()), "{id} was never listed");
    }
    assert!(
        ids.iter()
            .all(|id| before.contains(*id) || during.contains(*id)),
        "an order that was never placed"
    );
    assert!(seen.iter().all(|o| o.account == "acme"));
    assert!(
        seen.windows(2).all(|w| key(&w[0]) > key(&w[1])),
        "not newest first"
    );

    // Read again as a whole, the list is every order, newest first.
    let all = orders.on_behalf_of(&cx).list_all("acme").await.unwrap();
    assert_eq!(all.len(), before.len() + during.len());
    assert!(all.windows(2).all(|w| key(&w[0]) > key(&w[1])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_limit_or_cursor_is_a_problem_and_never_another_accounts_page() {
    let sys = System::start("page-refusals", &[]).await;
    let alice = login(&sys.auth.url(), "alice").await;
    let bob = login(&sys.auth.url(), "bob").await;
    let (orders, alice_cx) = client(&sys, "alice").await;
    let (_, bob_cx) = client(&sys, "bob").await;
    let acme_ticket = product(&sys, &alice, "acme", 10).await;
    let globex_ticket = product(&sys, &bob, "globex", 10).await;
    for _ in 0..3 {
        place(&orders, &alice_cx, "acme", &acme_ticket).await;
        place(&orders, &bob_cx, "globex", &globex_ticket).await;
    }

    for limit in ["0", "101", "-1", "x", ""] {
        let a = get(
            &sys,
            &alice,
            &format!("/orders/v1/acme/orders?limit={limit}"),
        )
        .await;
        assert_eq!(a.status, 422, "{limit:?}: {:?}", a.body);
        assert_eq!(a.headers["content-type"], "application/problem+json");
        assert_eq!(a.body["reason"], "invalid_fields");
        assert_eq!(a.body["errors"][0]["parameter"], "limit");
        assert_eq!(
            a.body["correlation_id"].as_str(),
            a.headers["x-correlation-id"].to_str().ok()
        );
    }

    // Alice's first page of acme, one order, and its link.
    let first = get(&sys, &alice, "/orders/v1/acme/orders?limit=1").await;
    assert_eq!(first.status, 200);
    let next = first.body["next"].as_str().unwrap().to_owned();
    assert_eq!(
        first.headers["link"].to_str().unwrap(),
        format!("<{next}>; rel=\"next\"")
    );
    let page: Page<Order> = serde_json::from_value(first.body.clone()).unwrap();
    assert_eq!(page.items.len(), 1);

    let cursor = next.split("cursor=").nth(1).unwrap();
    let mut edited = cursor.to_owned();
    edited.insert(5, 'Q');
    for (token, path) in [
        (&alice, "/orders/v1/acme/orders?cursor=garbage".to_owned()),
        (&alice, "/orders/v1/acme/orders?cursor=%00%FF".to_owned()),
        (&alice, format!("/orders/v1/acme/orders?cursor={edited}")),
        // Bob, on his own account's list, with acme's cursor: a problem,
        // never a page of anyone's orders.
        (&bob, next.replace("/acme/", "/globex/")),
    ] {
        let a = get(&sys, token, &path).await;
        assert_eq!(a.status, 422, "{path}: {:?}", a.body);
        assert_eq!(a.headers["content-type"], "application/problem+json");
        assert_eq!(a.body["errors"][0]["parameter"], "cursor", "{path}");
        assert!(a.body.get("items").is_none());
        assert_eq!(
            a.body["correlation_id"].as_str(),
            a.headers["x-correlation-id"].to_str().ok()
        );
    }
    // And bob may not read acme's list with it at all.
    assert_eq!(get(&sys, &bob, &next).await.status, 403);

    // Unchanged, alice's link gives her next order.
    let second = get(&sys, &alice, &next).await;
    assert_eq!(second.status, 200);
    let items = second.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["account"], "acme");
    assert_ne!(items[0]["id"], first.body["items"][0]["id"]);
    assert_ne!(second.body["next"], Value::Null);

    // The client's first page with the default limit: all three, the last.
    let listed = orders
        .on_behalf_of(&alice_cx)
        .list("acme", None)
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 3);
    assert!(listed.is_last());
}
