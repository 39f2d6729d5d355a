//! The four services as processes with NATS JetStream configured: orders
//! publishes its outbox events, ticketing and mail consume them.
//!
//! It needs the NATS server of `CHASSIS_TEST_NATS_URL` (default
//! `nats://127.0.0.1:4222`); each test's streams carry a prefix of their
//! own (`CHASSIS_NATS_PREFIX`) and are deleted at the end. Without the
//! server a test prints `NOT RUN` and passes, unless
//! `CHASSIS_REQUIRE_SERVERS` is set. The services' databases are those of
//! the run's engine (`CHASSIS_TEST_BACKEND`: SQLite, or PostgreSQL).

use std::{collections::HashSet, path::Path, time::Duration};

use async_nats::jetstream;
use chassis::{
    client::{CallContext, TokenSource},
    config::Secret,
    correlation::CorrelationId,
    messaging::{dead_letter_stream_name, headers, stream_name},
    permission::AccountId,
    testing::{TestNats, eventually},
};
use mail::client::MailClient;
use orders::{NewOrder, OrderStatus, OrdersClient};
use ticketing::client::{ReservationStatus, TicketingClient};

mod support;

use support::*;

/// The system on `nats`, with this test's prefix; a stream remembers event
/// ids for a second only, so that a test can publish an event again past
/// the window, as a relay that crashed for longer would.
async fn start_on(nats: &TestNats, name: &str) -> Running {
    start_with_env(
        name,
        &[
            ("CHASSIS_NATS_URL", nats.url()),
            ("CHASSIS_NATS_PREFIX", nats.prefix()),
            ("CHASSIS_NATS_DUPLICATE_WINDOW_SECS", "1"),
            ("CHASSIS_NATS_BACKOFF_MS", "100,200"),
            ("CHASSIS_NATS_LAG_POLL_MS", "200"),
        ],
    )
    .await
}

/// The `<message_id>.eml` in mail's outbox that mentions `order_id`.
fn mail_of(data: &Path, order_id: &str) -> Option<String> {
    std::fs::read_dir(data.join("mail").join("outbox"))
        .ok()?
        .filter_map(Result::ok)
        .find(|e| std::fs::read_to_string(e.path()).is_ok_and(|m| m.contains(order_id)))
        .and_then(|e| {
            e.path()
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
        })
}

fn log(data: &Path, service: &str) -> String {
    std::fs::read_to_string(data.join("logs").join(format!("{service}.log"))).unwrap_or_default()
}

/// Every message of `stream`: subject, headers, payload.
async fn messages(
    nats: &TestNats,
    stream: &str,
) -> Vec<(String, async_nats::HeaderMap, bytes::Bytes)> {
    let js = jetstream::new(nats.client());
    let Ok(mut stream) = js.get_stream(stream).await else {
        return Vec::new();
    };
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        if let Ok(m) = stream.get_raw_message(seq).await {
            out.push((m.subject.to_string(), m.headers, m.payload));
        }
    }
    out
}

fn header<'a>(h: &'a async_nats::HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).map(|v| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_are_confirmed_and_mailed_once_through_jetstream() {
    let Some(nats) = TestNats::or_skip("orders_through_jetstream").await else {
        return;
    };
    let mut system = start_on(&nats, "nats-orders").await;
    let e = system.endpoints();
    let shop = alice(&e, "ticketing").await;
    let cx = alice(&e, "orders").await;
    let ticket = product(&e, &shop, 100).await;
    let orders = OrdersClient::new(downstream("orders", &e.orders));

    // One order under a correlation id of the test's own.
    let traced = CallContext::continuing(CorrelationId::parse("e2e-nats-corr-1").unwrap())
        .with_principal(cx.principal().unwrap().clone());
    let order = NewOrder {
        ticket_id: ticket.clone(),
        quantity: 1,
        email: "alice@example.com".to_owned(),
    };
    let first = orders
        .on_behalf_of(&traced)
        .place("acme", &order, "nats-0")
        .await
        .expect("order placed")
        .order;
    let mut ids = HashSet::from([first.id.clone()]);
    for i in 1..6 {
        ids.insert(place(&orders, &cx, &ticket, &format!("nats-{i}")).await);
    }
    every_order_mailed_once(&e.data, &ids).await;

    // Each reservation confirmed in ticketing, each order marked so.
    let account = AccountId::parse("acme").unwrap();
    let ticketing = TicketingClient::new(downstream("ticketing", &e.ticketing));
    for id in &ids {
        let o = orders.on_behalf_of(&cx).get("acme", id).await.unwrap();
        eventually("the reservation confirmed", || async {
            ticketing
                .on_behalf_of(&shop)
                .get_reservation(&account, &o.reservation_id)
                .await
                .is_ok_and(|r| r.status == ReservationStatus::Confirmed)
        })
        .await;
        eventually("the order confirmed", || async {
            orders
                .on_behalf_of(&cx)
                .get("acme", id)
                .await
                .is_ok_and(|o| o.status == OrderStatus::Confirmed)
        })
        .await;
    }

    // They went through the broker: two events per order in orders'
    // stream, with the outbox's event ids, orders' token and the order's
    // correlation id.
    let orders_stream = stream_name(&nats.service("orders"));
    let published = messages(&nats, &orders_stream).await;
    assert_eq!(published.len(), 2 * ids.len(), "{published:?}");
    let placed = format!("{}.v1.acme.order.placed", nats.service("orders"));
    let confirm = format!("{}.v1.acme.reservation.confirm", nats.service("orders"));
    let ours: Vec<_> = published
        .iter()
        .filter(|(_, _, p)| String::from_utf8_lossy(p).contains(&first.id))
        .collect();
    let subjects: HashSet<&str> = ours.iter().map(|(s, _, _)| s.as_str()).collect();
    assert_eq!(subjects, HashSet::from([placed.as_str(), confirm.as_str()]));
    for (_, h, _) in &ours {
        assert_eq!(
            header(h, headers::X_CORRELATION_ID),
            Some("e2e-nats-corr-1")
        );
        assert!(header(h, headers::NATS_MSG_ID).is_some_and(|id| id.starts_with("evt")));
        assert!(header(h, headers::AUTHORIZATION).is_some_and(|a| a.starts_with("Bearer ")));
        assert!(header(h, headers::TRACEPARENT).is_some());
    }

    // The correlation id continued into mail's stored job and ticketing's
    // log; the mail's id is the event's.
    let message_id = mail_of(&e.data, &first.id).expect("the order's mail");
    let (placed_msg, _) = ours
        .iter()
        .find(|(s, _, _)| *s == placed)
        .map(|(_, h, p)| (h, p))
        .unwrap();
    assert_eq!(
        header(placed_msg, headers::NATS_MSG_ID),
        Some(message_id.as_str())
    );
    let admin = user(&e, "admin", "mail").await;
    let stored = MailClient::new(downstream("mail", &e.mail))
        .on_behalf_of(&admin)
        .get(&message_id)
        .await
        .expect("the mail job");
    assert_eq!(stored.correlation_id, "e2e-nats-corr-1");
    eventually("ticketing logged the confirmation", || async {
        log(&e.data, "ticketing")
            .lines()
            .any(|l| l.contains("reservation confirmed") && l.contains("e2e-nats-corr-1"))
    })
    .await;
    assert!(
        messages(&nats, &dead_letter_stream_name(&nats.service("mail")))
            .await
            .is_empty(),
        "nothing dead-lettered"
    );
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_published_again_is_mailed_once() {
    let Some(nats) = TestNats::or_skip("republished_event").await else {
        return;
    };
    let mut system = start_on(&nats, "nats-again").await;
    let e = system.endpoints();
    let shop = alice(&e, "ticketing").await;
    let cx = alice(&e, "orders").await;
    let ticket = product(&e, &shop, 10).await;
    let orders = OrdersClient::new(downstream("orders", &e.orders));
    let id = place(&orders, &cx, &ticket, "again-0").await;
    let ids = HashSet::from([id.clone()]);
    every_order_mailed_once(&e.data, &ids).await;

    // The relay crashed after the broker's ack, before marking the event
    // delivered, and published it again: the same message, event id,
    // token and all.
    let placed = format!("{}.v1.acme.order.placed", nats.service("orders"));
    let stored = messages(&nats, &stream_name(&nats.service("orders"))).await;
    let (_, h, payload) = stored
        .into_iter()
        .find(|(s, _, _)| *s == placed)
        .expect("order.placed in the stream");
    let js = jetstream::new(nats.client());
    let again = js
        .publish_with_headers(placed.clone(), h.clone(), payload.clone())
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(again.duplicate, "within the window the stream drops it");
    // Past the stream's window (1 s here) it is stored again, and mail's
    // dedup by event id is what keeps it to one mail.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let late = js
        .publish_with_headers(placed, h, payload)
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(!late.duplicate, "past the window the stream keeps it");
    eventually("mail saw the copy", || async {
        log(&e.data, "mail").contains("duplicate mail job; nothing queued")
    })
    .await;
    every_order_mailed_once(&e.data, &ids).await;
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_without_the_permission_is_refused_and_dead_lettered() {
    let Some(nats) = TestNats::or_skip("forbidden_publisher").await else {
        return;
    };
    let mut system = start_on(&nats, "nats-forbidden").await;
    let e = system.endpoints();
    // The mail client is a real service of the system, with no grants:
    // its token is valid for mail, but does not grant mail::send:message.
    let tokens = TokenSource::client_credentials(
        &format!("{}/auth/v1/token", e.auth),
        "mail",
        Secret::new("mail-secret".to_owned()),
    )
    .unwrap()
    .for_audience("mail");
    let bearer = tokens.authorization().await.expect("a token for mail");
    let mut h = async_nats::HeaderMap::new();
    h.insert(headers::NATS_MSG_ID, "evt_forged_1");
    h.insert(headers::AUTHORIZATION, bearer.to_str().unwrap());
    h.insert(headers::CONTENT_TYPE, headers::JSON);
    h.insert(headers::X_CORRELATION_ID, "e2e-forged");
    let payload = serde_json::json!({
        "account": "acme",
        "email": "mallory@example.com",
        "order_id": "ord_forged",
        "quantity": 1,
        "reservation_id": "rsv_forged",
        "ticket_id": "tkt_forged",
    });
    let subject = format!("{}.v1.acme.order.placed", nats.service("orders"));
    // orders' stream exists once orders started.
    jetstream::new(nats.client())
        .publish_with_headers(subject.clone(), h, payload.to_string().into())
        .await
        .unwrap()
        .await
        .expect("the stream takes it");

    let dlq = dead_letter_stream_name(&nats.service("mail"));
    eventually("dead-lettered", || async {
        !messages(&nats, &dlq).await.is_empty()
    })
    .await;
    let dead = messages(&nats, &dlq).await;
    let (dead_subject, dh, dead_payload) = &dead[0];
    assert_eq!(
        dead_subject,
        &format!("{}.dlq.{subject}", nats.service("mail"))
    );
    assert_eq!(header(dh, headers::DLQ_REASON), Some("forbidden"));
    assert_eq!(header(dh, headers::DLQ_EVENT_ID), Some("evt_forged_1"));
    assert_eq!(header(dh, headers::DLQ_PUBLISHER), Some("mail"));
    assert!(
        header(dh, headers::AUTHORIZATION).is_none(),
        "no token at rest"
    );
    assert_eq!(dead_payload.as_ref(), payload.to_string().as_bytes());
    // Audited as denied, and no mail queued or sent.
    eventually("the refusal audited", || async {
        log(&e.data, "mail")
            .lines()
            .any(|l| l.contains("evt_forged_1") && l.contains("\"forbidden\""))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(mail_of(&e.data, "ord_forged").is_none(), "nothing mailed");
    let admin = user(&e, "admin", "mail").await;
    assert!(
        MailClient::new(downstream("mail", &e.mail))
            .on_behalf_of(&admin)
            .get("evt_forged_1")
            .await
            .is_err(),
        "nothing queued"
    );
    system.stop().await;
}
