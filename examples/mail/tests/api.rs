//! The mail API over a real socket: real tokens, the real permission
//! checks, a real SQLite file and outbox per test. Calls go through the
//! driver client, which tests it too.

mod support;

use std::collections::BTreeSet;

use chassis::{
    client::{CallContext, ClientError},
    correlation::CorrelationId,
};
use http::HeaderValue;
use mail::client::{MailJob, MessageStatus};
use serde_json::{Value, json};
use support::{
    Server, TempDir, TestAuth, admin, caller, eventually, get, header, job, metric, orders, refusal,
};

#[tokio::test]
async fn a_job_becomes_one_mail_file_with_its_correlation_id() {
    let dir = TempDir::new("send");
    let server = Server::start(&dir, &[]).await;
    // As the outbox relay calls: with its own token, continuing the work of
    // the request that placed the order.
    let auth = TestAuth::start().await;
    let cx = CallContext::continuing(CorrelationId::parse("corr-send-1").unwrap());
    let mail = server.orders_client(&auth);

    let accepted = mail
        .as_service(&cx)
        .send(&job("evt-send-1", "alice@example.com"))
        .await
        .unwrap();
    assert_eq!(accepted.message_id, "evt-send-1");
    assert_eq!(accepted.status, MessageStatus::Queued);
    assert!(!accepted.duplicate);

    eventually("the mail file", || async {
        dir.eml("evt-send-1").is_some()
    })
    .await;
    let eml = dir.eml("evt-send-1").unwrap();
    assert_eq!(header(&eml, "To").as_deref(), Some("alice@example.com"));
    assert_eq!(
        header(&eml, "From").as_deref(),
        Some("tickets@chassis.example")
    );
    assert_eq!(
        header(&eml, "Subject").as_deref(),
        Some("Your lift tickets: order ord_evt-send-1")
    );
    assert_eq!(
        header(&eml, "X-Correlation-ID").as_deref(),
        Some("corr-send-1")
    );
    assert_eq!(
        header(&eml, "Message-ID").as_deref(),
        Some("<evt-send-1@chassis.example>")
    );
    assert!(eml.contains("Ticket:      Day pass (tkt_day)\r\n"), "{eml}");
    assert!(eml.contains("Total:       90.00 EUR\r\n"), "{eml}");
    assert_eq!(
        dir.outbox_files(),
        ["evt-send-1.eml"],
        "no temporary files left"
    );

    // What the service recorded, once the worker marked it sent (the file
    // is written just before).
    let admin = admin().await;
    let looked = server.client();
    eventually("the message to be marked sent", || async {
        looked
            .on_behalf_of(&admin)
            .get("evt-send-1")
            .await
            .unwrap()
            .status
            == MessageStatus::Sent
    })
    .await;
    let message = looked.on_behalf_of(&admin).get("evt-send-1").await.unwrap();
    assert_eq!(message.to, "alice@example.com");
    assert_eq!(message.template, "order_confirmation");
    assert_eq!(message.correlation_id, "corr-send-1");
    assert_eq!(message.attempts, 0);
    assert!(message.sent_at.as_deref().is_some_and(|t| t.ends_with('Z')));
    assert!(message.next_attempt_at.is_none());

    // A correlation id in the job wins over the request's.
    let with_own = job("evt-send-2", "bob@example.com").with_correlation_id("placed-by-bob");
    mail.as_service(&cx).send(&with_own).await.unwrap();
    eventually("the second file", || async {
        dir.eml("evt-send-2").is_some()
    })
    .await;
    assert_eq!(
        header(&dir.eml("evt-send-2").unwrap(), "X-Correlation-ID").as_deref(),
        Some("placed-by-bob")
    );

    // The wire format: 202, a Location, the contract's body.
    let res = mail
        .downstream()
        .as_service(&cx)
        .post("/mail/v1/messages")
        .json(&job("evt-send-3", "carol@example.com"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    assert_eq!(res.headers()["location"], "/mail/v1/messages/evt-send-3");
    let body: Value = res.json().unwrap();
    assert_eq!(
        body,
        json!({"message_id": "evt-send-3", "status": "queued"})
    );
    server.stop().await;
}

#[tokio::test]
async fn the_same_message_id_three_times_is_one_mail_and_two_duplicates() {
    let dir = TempDir::new("dedup");
    let server = Server::start(&dir, &[]).await;
    let cx = orders("corr-dedup").await;
    let calls = server.client();
    let calls = calls.on_behalf_of(&cx);
    let duplicates = || async {
        let (_, text) = get(&server.url("/metrics")).await;
        metric(&text, "mail_duplicates_total{service=\"mail\"}")
    };
    let before = duplicates().await;

    let first = calls
        .send(&job("evt-dup", "alice@example.com"))
        .await
        .unwrap();
    let second = calls
        .send(&job("evt-dup", "alice@example.com"))
        .await
        .unwrap();
    // A duplicate with other content changes nothing either.
    let third = calls
        .send(&job("evt-dup", "mallory@example.com"))
        .await
        .unwrap();
    assert!(!first.duplicate);
    assert!(second.duplicate && third.duplicate);
    assert_eq!(duplicates().await - before, 2.0);

    eventually("the mail file", || async { dir.eml("evt-dup").is_some() }).await;
    eventually("the message to be marked sent", || async {
        let res = calls
            .send(&job("evt-dup", "alice@example.com"))
            .await
            .unwrap();
        res.status == MessageStatus::Sent
    })
    .await;
    assert_eq!(dir.outbox_files(), ["evt-dup.eml"]);
    assert_eq!(
        header(&dir.eml("evt-dup").unwrap(), "To").as_deref(),
        Some("alice@example.com")
    );
    let (_, text) = get(&server.url("/metrics")).await;
    assert!(
        metric(
            &text,
            "mail_messages_total{service=\"mail\",status=\"queued\"}"
        ) >= 1.0,
        "{text}"
    );
    assert!(
        metric(
            &text,
            "mail_messages_total{service=\"mail\",status=\"sent\"}"
        ) >= 1.0
    );
    assert!(
        text.contains("mail_queue_depth{service=\"mail\"}"),
        "{text}"
    );

    // Twenty callers at once with one new id: exactly one stores it.
    let mut racers = Vec::new();
    for _ in 0..20 {
        let client = server.client();
        let cx = cx.clone();
        racers.push(tokio::spawn(async move {
            client
                .on_behalf_of(&cx)
                .send(&job("evt-race", "alice@example.com"))
                .await
                .unwrap()
                .duplicate
        }));
    }
    let mut new = 0;
    for r in racers {
        new += usize::from(!r.await.unwrap());
    }
    assert_eq!(new, 1);
    eventually("the raced message's file", || async {
        dir.eml("evt-race").is_some()
    })
    .await;
    assert_eq!(dir.outbox_files(), ["evt-dup.eml", "evt-race.eml"]);
    server.stop().await;
}

#[tokio::test]
async fn invalid_jobs_are_422_naming_every_field() {
    let dir = TempDir::new("invalid");
    let server = Server::start(&dir, &[]).await;
    let cx = orders("corr-invalid").await;
    let calls = server.client();
    let calls = calls.on_behalf_of(&cx);

    let bad = MailJob::new(
        "not valid!",
        "nobody",
        "newsletter",
        json!({"order_id": "x"}),
    );
    let (status, problem) = refusal(calls.send(&bad).await);
    assert_eq!(status, 422);
    assert_eq!(problem["status"], 422);
    assert_eq!(problem["correlation_id"], "corr-invalid");
    assert_eq!(problem["reason"], "invalid_fields");
    assert_eq!(problem["type"], "urn:chassis:problem:unprocessable-content");
    let fields: BTreeSet<&str> = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert!(e["detail"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
            e["pointer"].as_str().unwrap()
        })
        .collect();
    assert_eq!(
        fields,
        BTreeSet::from(["#/message_id", "#/to", "#/template"])
    );

    // The template's data is checked too.
    let mut incomplete = job("evt-bad-data", "alice@example.com");
    incomplete.data = json!({"order_id": "ord_1", "quantity": 0});
    let (status, problem) = refusal(calls.send(&incomplete).await);
    assert_eq!(status, 422);
    let fields: BTreeSet<&str> = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["pointer"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        BTreeSet::from(["#/data/ticket_id", "#/data/quantity"])
    );

    // Not JSON at all, or not an object.
    for (body, expected) in [("{", 400), ("[1]", 422), ("\"x\"", 422)] {
        let res = server
            .downstream()
            .on_behalf_of(&cx)
            .post("/mail/v1/messages")
            .body(
                body.to_owned(),
                HeaderValue::from_static("application/json"),
            )
            .send()
            .await;
        let (status, problem) = refusal(res);
        assert_eq!(status, expected, "{body}: {problem}");
        assert_eq!(problem["correlation_id"], "corr-invalid", "{problem}");
    }

    // Nothing was stored.
    let admin = admin().await;
    let (status, _) = refusal(
        server
            .client()
            .on_behalf_of(&admin)
            .get("evt-bad-data")
            .await,
    );
    assert_eq!(status, 404);
    assert!(dir.outbox_files().is_empty());
    server.stop().await;
}

#[tokio::test]
async fn calls_need_a_token_and_the_permission() {
    let dir = TempDir::new("authz");
    let server = Server::start(&dir, &[]).await;
    let mail = server.client();
    let nobody = caller("ticketing", &["ticketing:*:view:ticket"], "corr-authz").await;
    let job = job("evt-authz", "alice@example.com");

    // No token: 401.
    let res = server
        .downstream()
        .anonymous(&nobody)
        .post("/mail/v1/messages")
        .json(&job)
        .send()
        .await;
    let (status, problem) = refusal(res);
    assert_eq!(status, 401);
    assert_eq!(problem["reason"], "missing_token");

    // A token without `mail::send:message`: 403 naming it.
    let (status, problem) = refusal(mail.on_behalf_of(&nobody).send(&job).await);
    assert_eq!(status, 403);
    assert_eq!(problem["reason"], "forbidden");
    assert!(
        problem.to_string().contains("mail::send:message"),
        "{problem}"
    );

    // Sending does not let one read; viewing does not let one send.
    let orders = orders("corr-authz").await;
    mail.on_behalf_of(&orders).send(&job).await.unwrap();
    let (status, _) = refusal(mail.on_behalf_of(&orders).get("evt-authz").await);
    assert_eq!(status, 403);
    let admin = admin().await;
    let (status, _) = refusal(mail.on_behalf_of(&admin).send(&job).await);
    assert_eq!(status, 403);
    assert_eq!(
        mail.on_behalf_of(&admin)
            .get("evt-authz")
            .await
            .unwrap()
            .message_id,
        "evt-authz"
    );
    // A caller's own token, forwarded.
    assert_eq!(
        mail.on_behalf_of(&admin)
            .get("evt-authz")
            .await
            .unwrap()
            .message_id,
        "evt-authz"
    );
    server.stop().await;
}

#[tokio::test]
async fn unknown_and_malformed_ids_are_404() {
    let dir = TempDir::new("notfound");
    let server = Server::start(&dir, &[("MAIL_WORKERS", "0")]).await;
    let admin = admin().await;
    let mail = server.client();
    let (status, problem) = refusal(mail.on_behalf_of(&admin).get("evt-missing").await);
    assert_eq!(status, 404);
    assert_eq!(problem["correlation_id"], "admin-look");

    let res = server
        .downstream()
        .on_behalf_of(&admin)
        .get("/mail/v1/messages/bad%20id")
        .send()
        .await;
    assert_eq!(refusal(res).0, 404);

    // The client refuses to send a malformed id at all.
    let err = mail.on_behalf_of(&admin).get("bad/id").await.unwrap_err();
    assert!(matches!(err, ClientError::InvalidRequest { .. }), "{err:?}");
    server.stop().await;
}
