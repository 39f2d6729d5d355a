//! Delivery: retries and dead letters, leases that expire, several workers,
//! shutdown and restart, SMTP, against a real SQLite file, a real outbox
//! and a scriptable SMTP relay on loopback.

mod support;

use std::{collections::BTreeMap, time::Duration};

use mail::{RetryPolicy, client::MessageStatus};
use serde_json::Value;
use support::{
    Behaviour, FakeSmtp, Server, TempDir, admin, closed_port, database, eventually, get, job,
    now_ms, orders, row,
};

#[tokio::test]
async fn a_failing_relay_is_retried_with_backoff_then_the_message_is_dead() {
    let dir = TempDir::new("dead");
    let port = closed_port().await;
    let url = format!("smtp://127.0.0.1:{port}");
    let server = Server::start(
        &dir,
        &[
            ("MAIL_SMTP_URL", &url),
            ("MAIL_MAX_ATTEMPTS", "3"),
            ("MAIL_RETRY_BASE_MS", "100"),
            ("MAIL_RETRY_MAX_MS", "400"),
        ],
    )
    .await;
    let cx = orders("corr-dead").await;
    let mail = server.client();
    mail.on_behalf_of(&cx)
        .send(&job("evt-dead", "alice@example.com"))
        .await
        .unwrap();

    let db = database(&dir).await;
    // Each failure is recorded with a next attempt within the backoff bounds.
    let mut seen = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let r = row(&db, "evt-dead").await;
        if r.status == "queued" && r.attempts > 0 {
            seen.entry(r.attempts)
                .or_insert((now_ms(), r.next_attempt_at));
        }
        if r.status == "dead" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never dead: {r:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for (attempts, (observed_at, next)) in &seen {
        let ceiling = 100 * (1i64 << (attempts - 1));
        // Drawn from [0, ceiling] after the failure, which came before we
        // looked.
        assert!(
            *next <= observed_at + ceiling,
            "attempt {attempts}: {next} {observed_at}"
        );
    }
    let r = row(&db, "evt-dead").await;
    assert_eq!(r.attempts, 3);
    assert!(r.lease_owner.is_none() && r.lease_until.is_none());
    let error = r.last_error.unwrap();
    assert!(error.contains(&format!("127.0.0.1:{port}")), "{error}");

    // Visible to operators: the message, the metric, the health report.
    let admin = admin().await;
    let message = mail.on_behalf_of(&admin).get("evt-dead").await.unwrap();
    assert_eq!(message.status, MessageStatus::Dead);
    assert_eq!(message.attempts, 3);
    assert!(message.last_error.is_some());
    let (_, metrics) = get(&server.url("/metrics")).await;
    assert!(
        support::metric(
            &metrics,
            "mail_messages_total{service=\"mail\",status=\"dead\"}"
        ) >= 1.0,
        "{metrics}"
    );
    assert!(
        support::metric(
            &metrics,
            "mail_messages_total{service=\"mail\",status=\"failed\"}"
        ) >= 3.0
    );
    eventually("the dead-messages check to report it", || async {
        let (status, body) = get(&server.url("/health/ready")).await;
        let report: Value = serde_json::from_str(&body).unwrap();
        // Non-critical: the service still takes jobs.
        status == 200 && report["checks"]["dead-messages"]["status"] == "down"
    })
    .await;
    // Anyone sees the state; why, only an operator holding the permission.
    let (_, body) = get(&server.url("/health/ready")).await;
    assert!(!body.contains("dead message"), "{body}");
    let token = support::issuer().user_token("ops", &["mail::view:health"]);
    let detail = get_detail(&server.url("/health/ready?detail"), &token).await;
    assert_eq!(detail["checks"]["dead-messages"]["error"], "1 dead message");
    server.stop().await;
}

/// `GET url` with a bearer token, as JSON.
async fn get_detail(url: &str, token: &str) -> Value {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let req = http::Request::get(url)
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .body(http_body_util::Empty::new())
        .unwrap();
    let res = client.request(req).await.unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap()
}

#[tokio::test]
async fn a_poison_message_is_parked_while_others_flow() {
    let dir = TempDir::new("poison");
    let smtp = FakeSmtp::start(Behaviour::RefuseRecipient("poison@".to_owned())).await;
    let server = Server::start(
        &dir,
        &[
            ("MAIL_SMTP_URL", &smtp.url()),
            ("MAIL_MAX_ATTEMPTS", "4"),
            ("MAIL_RETRY_BASE_MS", "50"),
            ("MAIL_RETRY_MAX_MS", "200"),
        ],
    )
    .await;
    let cx = orders("corr-poison").await;
    let mail = server.client();
    let calls = mail.on_behalf_of(&cx);
    calls
        .send(&job("evt-poison", "poison@example.com"))
        .await
        .unwrap();
    for i in 0..5 {
        calls
            .send(&job(&format!("evt-good-{i}"), "alice@example.com"))
            .await
            .unwrap();
    }
    let db = database(&dir).await;
    eventually("the poison message to be dead", || async {
        row(&db, "evt-poison").await.status == "dead"
    })
    .await;
    eventually("the good messages to be sent", || async {
        let mut all = true;
        for i in 0..5 {
            all &= row(&db, &format!("evt-good-{i}")).await.status == "sent";
        }
        all
    })
    .await;
    let poison = row(&db, "evt-poison").await;
    assert_eq!(poison.attempts, 4);
    assert!(
        poison.last_error.as_deref().unwrap().contains("550"),
        "{poison:?}"
    );

    let received = smtp.received();
    assert_eq!(received.len(), 5, "each good message exactly once");
    let mut ids: Vec<String> = received
        .iter()
        .map(|m| m.header("Message-ID").unwrap())
        .collect();
    ids.sort();
    let expected: Vec<String> = (0..5)
        .map(|i| format!("<evt-good-{i}@chassis.example>"))
        .collect();
    assert_eq!(ids, expected);
    server.stop().await;
}

#[tokio::test]
async fn smtp_delivery_carries_the_envelope_and_headers() {
    let dir = TempDir::new("smtp");
    let smtp = FakeSmtp::start(Behaviour::Accept).await;
    let server = Server::start(
        &dir,
        &[
            ("MAIL_SMTP_URL", &smtp.url()),
            ("MAIL_FROM", "orders@ski.example"),
        ],
    )
    .await;
    let cx = orders("corr-smtp-1").await;
    server
        .client()
        .on_behalf_of(&cx)
        .send(&job("evt:smtp.1", "alice@example.com"))
        .await
        .unwrap();
    eventually("the relay to take the mail", || async {
        !smtp.received().is_empty()
    })
    .await;
    let m = &smtp.received()[0];
    assert_eq!(m.from, "<orders@ski.example>");
    assert_eq!(m.to, ["<alice@example.com>"]);
    assert_eq!(m.header("X-Correlation-ID").as_deref(), Some("corr-smtp-1"));
    assert_eq!(
        m.header("Message-ID").as_deref(),
        Some("<evt=3Asmtp=2E1@ski.example>")
    );
    assert_eq!(m.header("From").as_deref(), Some("orders@ski.example"));
    assert!(m.data.contains("Quantity:    2\r\n"), "{}", m.data);
    assert!(dir.outbox_files().is_empty(), "SMTP writes no files");
    let db = database(&dir).await;
    eventually("the message to be marked sent", || async {
        row(&db, "evt:smtp.1").await.status == "sent"
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn a_message_held_by_a_dead_worker_is_sent_once_after_its_lease_expires() {
    let dir = TempDir::new("lease");
    // Accept the job with no worker running.
    let server = Server::start(&dir, &[("MAIL_WORKERS", "0")]).await;
    let cx = orders("corr-lease").await;
    server
        .client()
        .on_behalf_of(&cx)
        .send(&job("evt-lease", "alice@example.com"))
        .await
        .unwrap();
    server.stop().await;

    // A worker took it, wrote the mail and died before marking it sent.
    let db = database(&dir).await;
    let lease_until = now_ms() + 1500;
    sqlx::query(
        "UPDATE messages SET status = 'sending', lease_owner = 'crashed-worker', lease_until = $1
         WHERE message_id = $2",
    )
    .bind(lease_until)
    .bind("evt-lease")
    .execute(&mut *db.writer().await.unwrap())
    .await
    .unwrap();
    std::fs::create_dir_all(dir.outbox()).unwrap();
    std::fs::write(
        dir.outbox().join("evt-lease.eml"),
        "the copy sent before the crash",
    )
    .unwrap();

    let server = Server::start(&dir, &[]).await;
    eventually("the message to be sent again", || async {
        row(&db, "evt-lease").await.status == "sent"
    })
    .await;
    let r = row(&db, "evt-lease").await;
    assert!(
        r.sent_at.unwrap() >= lease_until,
        "taken only after the lease expired"
    );
    assert_eq!(r.attempts, 0);
    assert!(r.lease_owner.is_none());
    // One file: the second send replaced the first.
    assert_eq!(dir.outbox_files(), ["evt-lease.eml"]);
    let eml = dir.eml("evt-lease").unwrap();
    assert_eq!(
        support::header(&eml, "X-Correlation-ID").as_deref(),
        Some("corr-lease")
    );
    server.stop().await;
}

#[tokio::test]
async fn workers_of_two_instances_never_send_a_message_twice() {
    let dir = TempDir::new("replicas");
    let smtp = FakeSmtp::start(Behaviour::Accept).await;
    let env = [
        ("MAIL_SMTP_URL", smtp.url()),
        ("MAIL_WORKERS", "3".to_owned()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let a = Server::start(&dir, &env).await;
    let b = Server::start(&dir, &env).await;
    let cx = orders("corr-replicas").await;
    let (ca, cb) = (a.client(), b.client());
    let n = 40;
    let mut sends = Vec::new();
    for i in 0..n {
        let client = if i % 2 == 0 { ca.clone() } else { cb.clone() };
        let cx = cx.clone();
        sends.push(tokio::spawn(async move {
            client
                .on_behalf_of(&cx)
                .send(&job(&format!("evt-r{i:02}"), "alice@example.com"))
                .await
                .unwrap()
        }));
    }
    for s in sends {
        assert!(!s.await.unwrap().duplicate);
    }
    let db = database(&dir).await;
    eventually("every message to be sent", || async {
        let sent: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM messages WHERE status = 'sent'")
            .fetch_one(db.pool())
            .await
            .unwrap();
        sent == n
    })
    .await;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for m in smtp.received() {
        *counts.entry(m.header("Message-ID").unwrap()).or_default() += 1;
    }
    assert_eq!(counts.len(), usize::try_from(n).unwrap());
    assert!(counts.values().all(|&c| c == 1), "{counts:?}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn shutdown_abandons_the_send_in_flight_and_the_next_start_sends_it() {
    let dir = TempDir::new("shutdown");
    let smtp = FakeSmtp::start(Behaviour::HangAfterData).await;
    let server = Server::start(
        &dir,
        &[
            ("MAIL_SMTP_URL", &smtp.url()),
            ("MAIL_LEASE_SECS", "6"),
            ("MAIL_SHUTDOWN_FINISH_MS", "200"),
        ],
    )
    .await;
    let cx = orders("corr-shutdown").await;
    server
        .client()
        .on_behalf_of(&cx)
        .send(&job("evt-inflight", "alice@example.com"))
        .await
        .unwrap();
    eventually("the relay to get the data", || async {
        smtp.data_seen() == 1
    })
    .await;

    // The relay never answers: the worker gives the message up and stops.
    let took = server.stop().await;
    assert!(took < Duration::from_secs(10), "stopped in {took:?}");
    let db = database(&dir).await;
    let r = row(&db, "evt-inflight").await;
    assert_eq!(r.status, "sending", "left leased: {r:?}");
    assert_eq!(r.attempts, 0);
    let lease_until = r.lease_until.unwrap();

    // The next start (here with files) sends it once the lease expires.
    let server = Server::start(&dir, &[]).await;
    eventually("the message to be sent after restart", || async {
        row(&db, "evt-inflight").await.status == "sent"
    })
    .await;
    assert!(row(&db, "evt-inflight").await.sent_at.unwrap() >= lease_until);
    assert_eq!(dir.outbox_files(), ["evt-inflight.eml"]);
    assert!(smtp.received().is_empty());
    server.stop().await;
}

#[tokio::test]
async fn a_restart_on_the_same_data_keeps_the_queue() {
    let dir = TempDir::new("restart");
    let server = Server::start(&dir, &[("MAIL_WORKERS", "0")]).await;
    let cx = orders("corr-restart").await;
    for i in 0..3 {
        server
            .client()
            .on_behalf_of(&cx)
            .send(&job(&format!("evt-q{i}"), "alice@example.com"))
            .await
            .unwrap();
    }
    let admin = admin().await;
    let queued = server
        .client()
        .on_behalf_of(&admin)
        .get("evt-q0")
        .await
        .unwrap();
    assert_eq!(queued.status, MessageStatus::Queued);
    assert!(queued.next_attempt_at.is_some());
    server.stop().await;
    assert!(dir.outbox_files().is_empty());

    let server = Server::start(&dir, &[]).await;
    // Three files, none of them still being written (a `.tmp`).
    eventually("the queue to drain", || async {
        dir.outbox_files()
            .iter()
            .filter(|f| f.ends_with(".eml"))
            .count()
            == 3
    })
    .await;
    assert_eq!(
        dir.outbox_files(),
        ["evt-q0.eml", "evt-q1.eml", "evt-q2.eml"]
    );
    // Accepted before the restart, still known as such.
    let again = server
        .client()
        .on_behalf_of(&cx)
        .send(&job("evt-q1", "alice@example.com"))
        .await
        .unwrap();
    assert!(again.duplicate);
    server.stop().await;
}

#[test]
fn the_backoff_is_exponential_with_full_jitter() {
    let policy = RetryPolicy {
        max_attempts: 8,
        base: Duration::from_millis(1000),
        max: Duration::from_millis(60_000),
    };
    // The schedule of ceilings: doubling from the base, capped.
    let ceilings: Vec<u128> = (1..=7).map(|n| policy.ceiling(n).as_millis()).collect();
    assert_eq!(ceilings, [1000, 2000, 4000, 8000, 16_000, 32_000, 60_000]);
    // Each delay is drawn from [0, ceiling], and spreads over it.
    for failures in 1..=7 {
        let ceiling = policy.ceiling(failures);
        let draws: Vec<Duration> = (0..2000).map(|_| policy.delay(failures)).collect();
        assert!(draws.iter().all(|d| *d <= ceiling));
        let low = draws.iter().filter(|d| **d < ceiling / 4).count();
        let high = draws.iter().filter(|d| **d > ceiling * 3 / 4).count();
        // About 500 each; far from 0 or 2000 unless the jitter is broken.
        assert!((300..700).contains(&low), "{failures}: {low} low");
        assert!((300..700).contains(&high), "{failures}: {high} high");
    }
    // The last attempt has no next one.
    assert!(policy.next(7).is_some());
    assert_eq!(policy.next(8), None);
}
