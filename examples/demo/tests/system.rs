//! The four services as real processes: the smoke run, and crashes (SIGKILL)
//! in the middle of the work, after which nothing is lost and nothing is
//! sent twice.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use chassis::client::{CallContext, Downstream};
use orders::{NewOrder, OrdersClient};

mod support;

use support::*;

#[test]
fn smoke_exits_zero() {
    let out = std::process::Command::new(exe())
        .arg("--smoke")
        .output()
        .expect("demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo --smoke failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("smoke: ok"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_killed_mid_flight_loses_nothing_and_reserves_nothing_twice() {
    let mut system = start("kill-orders").await;
    let e = system.endpoints();
    let shop = alice(&e, "ticketing").await;
    let cx = alice(&e, "orders").await;
    let ticket = product(&e, &shop, 100).await;
    let orders = OrdersClient::new(downstream("orders", &e.orders));

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let placing = {
        let (orders, cx, ticket) = (orders.clone(), cx.clone(), ticket.clone());
        tokio::spawn(async move {
            let mut ids = HashMap::new();
            for i in 0..12 {
                let key = format!("e2e-{i}");
                let id = place(&orders, &cx, &ticket, &key).await;
                let _ = tx.send(i);
                ids.insert(key, id);
            }
            ids
        })
    };
    // Crash orders after the fourth order, while the client keeps going.
    while let Some(i) = rx.recv().await {
        if i == 3 {
            break;
        }
    }
    system.kill("orders", 0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    system.restart("orders", 0).await.expect("orders restarts");

    let ids = placing.await.unwrap();
    let unique: HashSet<String> = ids.values().cloned().collect();
    assert_eq!(unique.len(), 12, "one order per key");
    // Every key replays its own order.
    let order = NewOrder {
        ticket_id: ticket.clone(),
        quantity: 1,
        email: "alice@example.com".to_owned(),
    };
    let replay = orders
        .on_behalf_of(&cx)
        .place("acme", &order, "e2e-3")
        .await
        .unwrap();
    assert!(replay.replayed);
    assert_eq!(replay.order.id, ids["e2e-3"]);
    assert_eq!(
        orders
            .on_behalf_of(&cx)
            .list_all("acme")
            .await
            .unwrap()
            .len(),
        12
    );

    every_order_mailed_once(&e.data, &unique).await;
    // No reservation was made twice or left behind: 12 places taken.
    let start = tokio::time::Instant::now();
    while available(&e, &shop, &ticket).await != 88 {
        assert!(start.elapsed() < Duration::from_secs(60), "capacity leaked");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_killed_mid_flight_sends_every_confirmation_once() {
    let mut system = start("kill-mail").await;
    let e = system.endpoints();
    let shop = alice(&e, "ticketing").await;
    let cx = alice(&e, "orders").await;
    let ticket = product(&e, &shop, 100).await;
    let orders = OrdersClient::new(downstream("orders", &e.orders));

    let mut ids = HashSet::new();
    for i in 0..10 {
        ids.insert(place(&orders, &cx, &ticket, &format!("mail-{i}")).await);
        if i == 2 {
            system.kill("mail", 0).await;
        }
    }
    // Orders were accepted while mail was down; the relay waits for it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    system.restart("mail", 0).await.expect("mail restarts");
    every_order_mailed_once(&e.data, &ids).await;
    system.stop().await;
}

fn one_order(ticket: &str) -> NewOrder {
    NewOrder {
        ticket_id: ticket.to_owned(),
        quantity: 1,
        email: "alice@example.com".to_owned(),
    }
}

/// O2: orders dies (SIGABRT) after writing the order and its events, before
/// the commit. Nothing of it remains; the client's retry with the same key
/// places exactly one order, reusing the reservation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_before_the_commit_leaves_nothing_and_the_retry_places_one_order() {
    let mut system = start("crash-before-commit").await;
    let e = system.endpoints();
    let shop = alice(&e, "ticketing").await;
    let cx = alice(&e, "orders").await;
    let ticket = product(&e, &shop, 100).await;
    let orders = OrdersClient::new(downstream("orders", &e.orders));
    system
        .restart_with(
            "orders",
            &[
                ("ORDERS_FAULT_CRASH", "before_commit"),
                ("ORDERS_IDEMPOTENCY_LEASE_SECS", "1"),
            ],
        )
        .await
        .unwrap();

    let crashed = orders
        .on_behalf_of(&cx)
        .place("acme", &one_order(&ticket), "o2")
        .await;
    assert!(crashed.is_err(), "the connection breaks: {crashed:?}");
    let status = system.exited("orders", 0).await.expect("orders died");
    assert!(!status.success(), "{status}");

    system
        .restart_with("orders", &[("ORDERS_IDEMPOTENCY_LEASE_SECS", "1")])
        .await
        .unwrap();
    assert!(
        orders
            .on_behalf_of(&cx)
            .list_all("acme")
            .await
            .unwrap()
            .is_empty(),
        "nothing half-made"
    );
    let id = place(&orders, &cx, &ticket, "o2").await;
    let listed = orders.on_behalf_of(&cx).list_all("acme").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, id);
    every_order_mailed_once(&e.data, &HashSet::from([id])).await;
    // The retry found the reservation the crashed attempt made.
    let start = tokio::time::Instant::now();
    while available(&e, &shop, &ticket).await != 99 {
        assert!(start.elapsed() < Duration::from_secs(60), "capacity leaked");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    system.stop().await;
}

/// O3: orders dies after the commit, before answering. The client sees the
/// connection break; its retry with the same key gets the stored answer,
/// and the order is mailed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_commit_is_answered_by_a_replay() {
    let mut system = start("crash-after-commit").await;
    let e = system.endpoints();
    let shop = alice(&e, "ticketing").await;
    let cx = alice(&e, "orders").await;
    let ticket = product(&e, &shop, 100).await;
    let orders = OrdersClient::new(downstream("orders", &e.orders));
    system
        .restart_with("orders", &[("ORDERS_FAULT_CRASH", "after_commit")])
        .await
        .unwrap();

    let crashed = orders
        .on_behalf_of(&cx)
        .place("acme", &one_order(&ticket), "o3")
        .await;
    assert!(crashed.is_err(), "the connection breaks: {crashed:?}");
    system.exited("orders", 0).await.expect("orders died");

    system.restart_with("orders", &[]).await.unwrap();
    let placed = orders
        .on_behalf_of(&cx)
        .place("acme", &one_order(&ticket), "o3")
        .await
        .expect("the retry is answered");
    assert!(placed.replayed, "the stored answer, not a new order");
    let listed = orders.on_behalf_of(&cx).list_all("acme").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, placed.order.id);
    every_order_mailed_once(&e.data, &HashSet::from([placed.order.id])).await;
    assert_eq!(available(&e, &shop, &ticket).await, 99);
    system.stop().await;
}

/// O13: SIGTERM while orders are coming in. Orders exits 0; every order it
/// answered 201 for exists and is mailed once; a request it refused or
/// could not take leaves nothing, and its retry after the restart places
/// the order once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_nothing_that_was_accepted() {
    let mut system = start("sigterm").await;
    let e = system.endpoints();
    let shop = alice(&e, "ticketing").await;
    let cx = alice(&e, "orders").await;
    let ticket = product(&e, &shop, 1000).await;
    let orders = OrdersClient::new(
        Downstream::builder("orders", &e.orders)
            .max_attempts(1)
            .build()
            .unwrap(),
    );
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (orders, cx, ticket) = (orders.clone(), cx.clone(), ticket.clone());
            tokio::spawn(async move {
                let mut accepted = Vec::new();
                let mut refused = Vec::new();
                for i in 0..25 {
                    let key = format!("term-{c}-{i}");
                    match orders
                        .on_behalf_of(&cx)
                        .place("acme", &one_order(&ticket), &key)
                        .await
                    {
                        Ok(p) => accepted.push(p.order.id),
                        Err(err) => {
                            refused.push(key);
                            if err.is_unavailable() {
                                break;
                            }
                        }
                    }
                }
                (accepted, refused)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = system.terminate("orders", 0).await.expect("orders stopped");
    assert!(status.success(), "orders exits 0 on SIGTERM: {status}");

    let mut accepted = HashSet::new();
    let mut refused = Vec::new();
    for c in clients {
        let (a, r) = c.await.unwrap();
        accepted.extend(a);
        refused.extend(r);
    }
    assert!(!accepted.is_empty(), "orders were taken before the signal");

    system.restart("orders", 0).await.unwrap();
    let orders = OrdersClient::new(downstream("orders", &e.orders));
    for key in &refused {
        accepted.insert(place(&orders, &cx, &ticket, key).await);
    }
    let listed: HashSet<String> = orders
        .on_behalf_of(&cx)
        .list_all("acme")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.id)
        .collect();
    // At most 100 orders, all of them in the listing.
    assert_eq!(listed, accepted, "exactly the accepted orders exist");
    every_order_mailed_once(&e.data, &accepted).await;
    system.stop().await;
}

/// Each service accepts only tokens minted for it: alice's token for
/// ticketing is refused by mail and by orders, and orders' own calls to
/// ticketing and mail (tokens asked for their audiences) go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_minted_for_one_service_is_refused_by_the_others() {
    let mut system = start("audiences").await;
    let e = system.endpoints();
    let shop = alice(&e, "ticketing").await;
    let ticket = product(&e, &shop, 10).await;
    for (name, url, path) in [
        ("mail", &e.mail, "/mail/v1/messages/m-1"),
        ("orders", &e.orders, "/orders/v1/acme/orders"),
    ] {
        let err = downstream(name, url)
            .on_behalf_of(&shop)
            .get(path)
            .send()
            .await
            .expect_err("refused");
        match err {
            chassis::client::ClientError::Status {
                status, problem, ..
            } => {
                assert_eq!(status, 401, "{name}");
                let problem = problem.expect("a problem body");
                assert_eq!(
                    problem.members["reason"], "bad_audience",
                    "{name}: {problem:?}"
                );
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    // An order (orders → ticketing as itself, then → mail) still flows.
    let cx = alice(&e, "orders").await;
    let orders = OrdersClient::new(downstream("orders", &e.orders));
    let id = place(&orders, &cx, &ticket, "aud-1").await;
    every_order_mailed_once(&e.data, &HashSet::from([id])).await;
    system.stop().await;
}

/// The demo's users and clients are data: an edit of auth's grants file
/// reaches the user's next token while everything runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_of_the_grants_file_reaches_the_next_token() {
    let mut system = start("grants").await;
    let e = system.endpoints();
    let file = demo::system::grants_file(&e.data);
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(text, auth::DEMO_GRANTS, "the demo wrote its grants file");
    let acme_orders = |cx: CallContext| {
        let orders = e.orders.clone();
        async move {
            downstream("orders", &orders)
                .on_behalf_of(&cx)
                .get("/orders/v1/acme/orders")
                .send()
                .await
        }
    };
    let err = acme_orders(user(&e, "bob", "orders").await)
        .await
        .expect_err("bob may not see acme's orders");
    assert!(
        matches!(&err, chassis::client::ClientError::Status { status, .. } if *status == 403),
        "{err:?}"
    );

    // Bob may now view acme's orders: written as a deployment would, whole.
    let grants = r#"grants = ["ticketing:globex:*:*", "orders:globex:*:*"]"#;
    assert!(text.contains(grants), "{text}");
    let edited = text.replace(
        grants,
        r#"grants = ["ticketing:globex:*:*", "orders:globex:*:*", "orders:acme:view:order"]"#,
    );
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, edited).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    let start = tokio::time::Instant::now();
    while acme_orders(user(&e, "bob", "orders").await).await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "bob's new grant never arrived"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    system.stop().await;
}
