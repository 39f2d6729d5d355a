//! Messaging against the real NATS JetStream (`CHASSIS_TEST_NATS_URL`,
//! default `nats://127.0.0.1:4222`): each test in streams of its own.
//! Tests that cannot reach it say they did not run, unless
//! `CHASSIS_REQUIRE_SERVERS` is set.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use chassis::{
    audit::{AuditDecision, AuditEvent, AuditSink, Auditor, MessageOutcome},
    auth::Verifier,
    context::{CorrelationId, TraceContext},
    health::Check,
    messaging::{
        Consumer, HandlerError, Message, MessagingConfig, MessagingError, OutgoingEvent, Published,
        Publisher, StaticToken, Subject, Subscription, dead_letter_stream_name, headers,
    },
    permission::AccountId,
    testing::{TcpProxy, TestIssuer, TestNats, eventually},
};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

// === support ===

/// Audit events kept in memory.
#[derive(Clone, Default)]
struct Memory(Arc<Mutex<Vec<AuditEvent>>>);

impl AuditSink for Memory {
    fn write(&self, events: &[AuditEvent]) -> std::io::Result<()> {
        self.0.lock().unwrap().extend_from_slice(events);
        Ok(())
    }
}

/// The global metrics recorder of this test binary, installed once.
fn snapshotter() -> &'static metrics_util::debugging::Snapshotter {
    static S: OnceLock<metrics_util::debugging::Snapshotter> = OnceLock::new();
    S.get_or_init(|| {
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let s = recorder.snapshotter();
        metrics::set_global_recorder(recorder).expect("only this test binary installs one");
        s
    })
}

fn gauge(name: &str, consumer: &str) -> Option<f64> {
    snapshotter()
        .snapshot()
        .into_vec()
        .into_iter()
        .find_map(|(key, _, _, value)| {
            let k = key.key();
            let ours = k.name() == name
                && k.labels()
                    .any(|l| l.key() == "consumer" && l.value() == consumer);
            match (ours, value) {
                (true, metrics_util::debugging::DebugValue::Gauge(g)) => Some(g.into_inner()),
                _ => None,
            }
        })
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// One test's world: a publisher service and a consumer service with names
/// of their own, the test issuer, an audit sink in memory.
struct World {
    nats: TestNats,
    issuer: TestIssuer,
    orders: String,
    mail: String,
    audit: Memory,
    auditor: Auditor,
}

impl World {
    async fn new(test: &str) -> Option<Self> {
        snapshotter();
        let nats = TestNats::or_skip(test).await?;
        let orders = nats.service("orders");
        let mail = nats.service("mail");
        let audit = Memory::default();
        let auditor = Auditor::new(&mail, audit.clone(), 4096);
        Some(Self {
            nats,
            issuer: TestIssuer::new(),
            orders,
            mail,
            audit,
            auditor,
        })
    }

    fn account(&self, name: &str) -> AccountId {
        AccountId::parse(name).unwrap()
    }

    fn subject(&self, account: &str) -> Subject {
        Subject::new(&self.orders, 1, &self.account(account), "order.placed").unwrap()
    }

    /// The publishing service's token, granting `perms`.
    fn token(&self, perms: &[&str]) -> String {
        self.issuer.service_token(&self.orders, perms)
    }

    async fn publisher(&self, config: &MessagingConfig, token: &str) -> Publisher {
        Publisher::new(
            self.nats.client(),
            config,
            &self.orders,
            &[1],
            StaticToken::bearer(token),
        )
        .await
        .unwrap()
    }

    fn subscription(&self) -> Subscription {
        Subscription::new(&self.orders, 1, "order.placed")
            .requires(&format!("{}:{{account}}:send:message", self.mail))
    }

    fn grant(&self, account: &str) -> String {
        format!("{}:{account}:send:message", self.mail)
    }

    /// A consumer whose handler records what it got, started in the
    /// background.
    fn consumer(&self, config: &MessagingConfig, verifier: Verifier, seen: Seen) -> Consumer {
        self.consumer_on(self.nats.client(), config, verifier, seen)
    }

    /// [`consumer`](Self::consumer) on a client of its own.
    fn consumer_on(
        &self,
        client: async_nats::Client,
        config: &MessagingConfig,
        verifier: Verifier,
        seen: Seen,
    ) -> Consumer {
        Consumer::builder(client, config, &self.mail, self.subscription())
            .verifier(verifier)
            .auditor(self.auditor.clone())
            .handler(move |m: Message<Value>| {
                let seen = seen.clone();
                async move {
                    seen.0.lock().unwrap().push(Got {
                        event_id: m.event_id().to_owned(),
                        correlation_id: m.correlation_id().to_string(),
                        trace_id: m.trace().trace_id().to_string(),
                        parent_id: m.trace().parent_id().map(|p| p.to_string()),
                        publisher: m.publisher().map(|p| p.subject().to_owned()),
                        account: m.subject().account().to_string(),
                        delivery: m.delivery(),
                    });
                    Ok(())
                }
            })
            .build()
            .unwrap()
    }

    /// Publishes raw, bypassing the publisher: for messages the chassis
    /// would never send.
    async fn raw(&self, subject: &str, headers: &[(&str, &str)], payload: &[u8]) {
        let js = async_nats::jetstream::new(self.nats.client());
        let mut h = async_nats::HeaderMap::new();
        for (k, v) in headers {
            h.insert(*k, *v);
        }
        js.publish_with_headers(subject.to_owned(), h, payload.to_vec().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    fn audited(&self) -> Vec<AuditEvent> {
        self.auditor.flush();
        self.audit.0.lock().unwrap().clone()
    }

    /// Audit events of messages on `subject`.
    fn audited_on(&self, subject: &str) -> Vec<AuditEvent> {
        self.audited()
            .into_iter()
            .filter(|e| e.message.as_ref().is_some_and(|m| &*m.subject == subject))
            .collect()
    }

    /// The dead letters of the consumer's service: subject and headers.
    async fn dead_letters(&self) -> Vec<(String, HashMap<String, String>, Vec<u8>)> {
        let js = async_nats::jetstream::new(self.nats.client());
        let Ok(mut stream) = js.get_stream(dead_letter_stream_name(&self.mail)).await else {
            return Vec::new();
        };
        let last = stream.info().await.unwrap().state.last_sequence;
        let mut out = Vec::new();
        for seq in 1..=last {
            let Ok(m) = stream.get_raw_message(seq).await else {
                continue;
            };
            let h = m
                .headers
                .iter()
                .map(|(k, v)| {
                    let k: &str = k.as_ref();
                    (k.to_owned(), v[0].as_str().to_owned())
                })
                .collect();
            out.push((m.subject.to_string(), h, m.payload.to_vec()));
        }
        out
    }
}

#[derive(Debug, Clone)]
struct Got {
    event_id: String,
    correlation_id: String,
    trace_id: String,
    parent_id: Option<String>,
    publisher: Option<String>,
    account: String,
    delivery: u64,
}

#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<Got>>>);

impl Seen {
    fn all(&self) -> Vec<Got> {
        self.0.lock().unwrap().clone()
    }
    fn count(&self, event_id: &str) -> usize {
        self.all().iter().filter(|g| g.event_id == event_id).count()
    }
}

fn fast(nats: &TestNats) -> MessagingConfig {
    MessagingConfig {
        backoff: vec![Duration::from_millis(50), Duration::from_millis(100)],
        lag_poll: Duration::from_millis(100),
        ..nats.config()
    }
}

// === tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_goes_round_with_its_headers_once_and_a_republish_is_dropped() {
    let Some(w) = World::new("round trip").await else {
        return;
    };
    let config = fast(&w.nats);
    let publisher = w.publisher(&config, &w.token(&[&w.grant("acme")])).await;
    let seen = Seen::default();
    let consumer = w.consumer(&config, w.issuer.verifier(), seen.clone());
    let stop = CancellationToken::new();
    let running = tokio::spawn(consumer.clone().run(stop.clone()));

    let trace = TraceContext::from_traceparent(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        None,
    )
    .unwrap();
    let event = OutgoingEvent::json(w.subject("acme"), "evt-1", &json!({"order_id": "o1"}))
        .unwrap()
        .correlation_id(CorrelationId::parse("order-42").unwrap())
        .trace(trace);
    let first = publisher.publish(&event).await.unwrap();
    assert!(!first.duplicate);
    assert_eq!(first.stream, format!("{}-events", w.orders));
    // The outbox relay died before marking the row sent: the same event again.
    let again: Published = publisher.publish(&event).await.unwrap();
    assert!(again.duplicate, "the stream drops a re-published event");
    assert_eq!(again.sequence, first.sequence);
    // A second event, after which the first has certainly been handled.
    let next = OutgoingEvent::json(w.subject("acme"), "evt-2", &json!({})).unwrap();
    publisher.publish(&next).await.unwrap();
    eventually("both events processed", || async {
        seen.count("evt-2") == 1
    })
    .await;
    eventually("the first processed", || async { seen.count("evt-1") == 1 }).await;

    let got = seen
        .all()
        .into_iter()
        .find(|g| g.event_id == "evt-1")
        .unwrap();
    assert_eq!(got.correlation_id, "order-42");
    assert_eq!(got.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert!(
        got.parent_id.is_some(),
        "the consumer span continues the producer's"
    );
    assert_ne!(
        got.parent_id.as_deref(),
        Some("00f067aa0ba902b7"),
        "the producer span sits between"
    );
    assert_eq!(got.publisher.as_deref(), Some(w.orders.as_str()));
    assert_eq!((got.account.as_str(), got.delivery), ("acme", 1));

    let subject = w.subject("acme").to_string();
    eventually("audited", || async { w.audited_on(&subject).len() == 2 }).await;
    let audited = w.audited_on(&subject);
    let e = audited
        .iter()
        .find(|e| e.message.as_ref().unwrap().event_id.as_deref() == Some("evt-1"))
        .unwrap();
    assert_eq!(e.decision, AuditDecision::Allow);
    assert_eq!(&*e.subject, w.orders.as_str());
    assert_eq!(e.subject_kind, "service");
    assert_eq!(e.method.as_str(), "MESSAGE");
    assert_eq!(e.route.as_str(), format!("{}.v1.*.order.placed", w.orders));
    assert_eq!(e.permission.as_ref().unwrap().to_string(), w.grant("acme"));
    assert_eq!(e.correlation_id.as_ref().unwrap().as_str(), "order-42");
    assert_eq!(
        e.message.as_ref().unwrap().outcome,
        MessageOutcome::Processed
    );

    // Nothing more arrives: processed exactly once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(seen.count("evt-1"), 1);
    stop.cancel();
    running.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_messages_are_dead_lettered_audited_and_never_processed() {
    let Some(w) = World::new("refusals").await else {
        return;
    };
    let config = fast(&w.nats);
    // Only to create the stream.
    w.publisher(&config, &w.token(&[])).await;
    let seen = Seen::default();
    let consumer = w.consumer(&config, w.issuer.verifier(), seen.clone());

    let t = now();
    let good = |account: &str| w.token(&[&w.grant(account)]);
    let expired = w.issuer.sign(&json!({
        "iss": "https://issuer.test", "aud": "chassis-test", "sub": w.orders,
        "iat": t - 600, "exp": t - 300, "kind": "service", "perms": [w.grant("expired")],
    }));
    // Signed by a key the verifier does not know, under the test key's id.
    let forged = {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let key = jsonwebtoken::EncodingKey::from_ed_pem(key.serialize_pem().as_bytes()).unwrap();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
        header.kid = Some("chassis-test-key".to_owned());
        let claims = json!({
            "iss": "https://issuer.test", "aud": "chassis-test", "sub": w.orders,
            "iat": t, "exp": t + 600, "kind": "service", "perms": [w.grant("forged")],
        });
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    };
    let other_audience = TestIssuer::with("https://issuer.test", "billing")
        .service_token(&w.orders, &[&w.grant("audience")]);
    let lacking = w.token(&[&w.grant("someone-else")]);

    let bearer = |t: &str| format!("Bearer {t}");
    /// Account, extra headers, payload, decision, reason.
    type Case<'a> = (
        &'a str,
        Vec<(&'a str, String)>,
        &'a [u8],
        AuditDecision,
        &'a str,
    );
    let cases: Vec<Case<'_>> = vec![
        (
            "notoken",
            vec![],
            b"{}",
            AuditDecision::Unauthenticated,
            "missing_token",
        ),
        (
            "expired",
            vec![("authorization", bearer(&expired))],
            b"{}",
            AuditDecision::Unauthenticated,
            "expired",
        ),
        (
            "forged",
            vec![("authorization", bearer(&forged))],
            b"{}",
            AuditDecision::Unauthenticated,
            "bad_signature",
        ),
        (
            "audience",
            vec![("authorization", bearer(&other_audience))],
            b"{}",
            AuditDecision::Unauthenticated,
            "bad_audience",
        ),
        (
            "lacking",
            vec![("authorization", bearer(&lacking))],
            b"{}",
            AuditDecision::Deny,
            "forbidden",
        ),
        (
            "badjson",
            vec![("authorization", bearer(&good("badjson")))],
            b"{not json",
            AuditDecision::Rejected,
            "malformed_payload",
        ),
    ];
    for (account, extra, payload, _, _) in &cases {
        let id = format!("evt-{account}");
        let mut h: Vec<(&str, &str)> = vec![("Nats-Msg-Id", &id), ("x-correlation-id", account)];
        h.extend(extra.iter().map(|(k, v)| (*k, v.as_str())));
        w.raw(w.subject(account).as_str(), &h, payload).await;
    }
    // No event id, else valid.
    let valid_token = bearer(&good("noid"));
    w.raw(
        w.subject("noid").as_str(),
        &[("authorization", &valid_token)],
        b"{}",
    )
    .await;
    // A valid one after all of them: the refused never block it.
    let ok_token = bearer(&good("fine"));
    w.raw(
        w.subject("fine").as_str(),
        &[("authorization", &ok_token), ("Nats-Msg-Id", "evt-fine")],
        b"{}",
    )
    .await;

    let stop = CancellationToken::new();
    let running = tokio::spawn(consumer.run(stop.clone()));
    eventually("the valid message processed", || async {
        seen.count("evt-fine") == 1
    })
    .await;
    eventually("every refusal dead-lettered", || async {
        w.dead_letters().await.len() == cases.len() + 1
    })
    .await;
    assert_eq!(
        seen.all().len(),
        1,
        "only the valid message reached the handler: {:?}",
        seen.all()
    );

    let letters = w.dead_letters().await;
    let mut expected: Vec<(&str, AuditDecision, &str)> =
        cases.iter().map(|(a, _, _, d, r)| (*a, *d, *r)).collect();
    expected.push(("noid", AuditDecision::Rejected, "missing_event_id"));
    for (account, decision, reason) in expected {
        let subject = w.subject(account).to_string();
        let (dlq_subject, h, payload) = letters
            .iter()
            .find(|(_, h, _)| h.get(headers::DLQ_SUBJECT) == Some(&subject))
            .unwrap_or_else(|| panic!("no dead letter for {account}: {letters:?}"));
        assert_eq!(dlq_subject, &format!("{}.dlq.{subject}", w.mail));
        assert_eq!(
            h.get(headers::DLQ_REASON).map(String::as_str),
            Some(reason),
            "{account}"
        );
        assert!(
            !h.contains_key("authorization"),
            "no credential kept: {h:?}"
        );
        assert_eq!(
            h.get(headers::DLQ_DELIVERIES).map(String::as_str),
            Some("1")
        );
        assert_eq!(h.get(headers::DLQ_CONSUMER), Some(&consumer_name(&w)));
        if account != "noid" {
            assert_eq!(
                h.get("x-correlation-id").map(String::as_str),
                Some(account),
                "original headers kept"
            );
        }
        let sent: &[u8] = if account == "badjson" {
            b"{not json"
        } else {
            b"{}"
        };
        assert_eq!(payload.as_slice(), sent, "original payload kept");

        let audited = w.audited_on(&subject);
        assert_eq!(
            audited.len(),
            1,
            "{account}: exactly one audit event: {audited:?}"
        );
        let e = &audited[0];
        assert_eq!(
            (e.decision, e.reason),
            (decision, Some(reason)),
            "{account}"
        );
        assert_eq!(
            e.message.as_ref().unwrap().outcome,
            MessageOutcome::DeadLettered
        );
    }
    // The refused publishers are named where a token verified.
    let lacking = &w.audited_on(w.subject("lacking").as_str())[0];
    assert_eq!(&*lacking.subject, w.orders.as_str());
    let none = &w.audited_on(w.subject("notoken").as_str())[0];
    assert_eq!(&*none.subject, "anonymous");
    stop.cancel();
    running.await.unwrap();
}

fn consumer_name(w: &World) -> String {
    format!("{}-{}-v1-order_placed", w.mail, w.orders)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_judged_by_the_broker_timestamp_not_by_the_delivery_time() {
    let Some(w) = World::new("expired while waiting").await else {
        return;
    };
    let config = fast(&w.nats);
    let verifier = w
        .issuer
        .verifier_builder()
        .leeway(Duration::ZERO)
        .build()
        .unwrap();
    let t = now();
    let exp = t + 4;
    let token = w.issuer.sign(&json!({
        "iss": "https://issuer.test", "aud": "chassis-test", "sub": w.orders,
        "iat": t, "exp": exp, "kind": "service", "perms": [w.grant("late")],
    }));
    let publisher = w.publisher(&config, &token).await;
    let event = OutgoingEvent::json(w.subject("late"), "evt-waited", &json!({})).unwrap();
    publisher.publish(&event).await.unwrap();
    assert!(
        now() < exp,
        "the machine took over 4 s to publish; the premise does not hold"
    );

    // The consumer is down until the token has expired.
    while now() <= exp {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        verifier.verify_token(&token).await.unwrap_err().code(),
        "expired",
        "the token is expired by now"
    );
    // The captured token replayed after its expiry.
    let replay = OutgoingEvent::json(w.subject("late"), "evt-replayed", &json!({})).unwrap();
    publisher.publish(&replay).await.unwrap();

    let seen = Seen::default();
    let consumer = w.consumer(&config, verifier, seen.clone());
    let stop = CancellationToken::new();
    let running = tokio::spawn(consumer.run(stop.clone()));
    eventually("the waited message processed", || async {
        seen.count("evt-waited") == 1
    })
    .await;
    eventually("the replay dead-lettered", || async {
        w.dead_letters().await.iter().any(|(_, h, _)| {
            h.get(headers::DLQ_EVENT_ID).map(String::as_str) == Some("evt-replayed")
        })
    })
    .await;
    let letters = w.dead_letters().await;
    assert_eq!(letters.len(), 1);
    assert_eq!(
        letters[0].1.get(headers::DLQ_REASON).map(String::as_str),
        Some("expired")
    );
    assert_eq!(seen.count("evt-replayed"), 0);
    stop.cancel();
    running.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_back_off_then_dead_letter_with_the_last_error_and_poison_never_blocks() {
    let Some(w) = World::new("max deliver").await else {
        return;
    };
    let config = MessagingConfig {
        max_deliver: 3,
        // One at a time: a poison message that blocked would stop the rest.
        max_in_flight: 1,
        ..fast(&w.nats)
    };
    let publisher = w.publisher(&config, &w.token(&[&w.grant("*")])).await;
    let attempts: Arc<Mutex<Vec<(String, u64, tokio::time::Instant)>>> = Arc::default();
    let log = attempts.clone();
    let consumer = Consumer::builder(w.nats.client(), &config, &w.mail, w.subscription())
        .verifier(w.issuer.verifier())
        .auditor(w.auditor.clone())
        .handler(move |m: Message<Value>| {
            let log = log.clone();
            async move {
                log.lock().unwrap().push((
                    m.event_id().to_owned(),
                    m.delivery(),
                    tokio::time::Instant::now(),
                ));
                match m.event_id() {
                    "evt-flaky" => Err(HandlerError::retry(
                        "downstream_unavailable",
                        format!("attempt {}", m.delivery()),
                    )),
                    "evt-poison" => Err(HandlerError::permanent("unknown_order", "no order o9")),
                    _ => Ok(()),
                }
            }
        })
        .build()
        .unwrap();
    for id in ["evt-flaky", "evt-poison", "evt-good"] {
        let account = id.trim_start_matches("evt-");
        publisher
            .publish(&OutgoingEvent::json(w.subject(account), id, &json!({})).unwrap())
            .await
            .unwrap();
    }
    let stop = CancellationToken::new();
    let running = tokio::spawn(consumer.run(stop.clone()));
    eventually("both failures dead-lettered", || async {
        w.dead_letters().await.len() == 2
    })
    .await;
    eventually("the good one processed", || async {
        attempts
            .lock()
            .unwrap()
            .iter()
            .any(|(id, _, _)| id == "evt-good")
    })
    .await;

    let attempts = attempts.lock().unwrap().clone();
    let flaky: Vec<_> = attempts
        .iter()
        .filter(|(id, _, _)| id == "evt-flaky")
        .collect();
    assert_eq!(
        flaky.iter().map(|(_, d, _)| *d).collect::<Vec<_>>(),
        [1, 2, 3],
        "delivered max_deliver times"
    );
    assert!(
        flaky[1].2 - flaky[0].2 >= Duration::from_millis(50),
        "first backoff"
    );
    assert!(
        flaky[2].2 - flaky[1].2 >= Duration::from_millis(100),
        "second backoff"
    );
    let poison: Vec<_> = attempts
        .iter()
        .filter(|(id, _, _)| id == "evt-poison")
        .collect();
    assert_eq!(poison.len(), 1, "a permanent failure is not retried");

    let letters = w.dead_letters().await;
    let flaky_letter = letters
        .iter()
        .find(|(_, h, _)| h.get(headers::DLQ_EVENT_ID).map(String::as_str) == Some("evt-flaky"))
        .unwrap();
    assert_eq!(
        flaky_letter.1.get(headers::DLQ_ERROR).map(String::as_str),
        Some("attempt 3")
    );
    assert_eq!(
        flaky_letter.1.get(headers::DLQ_REASON).map(String::as_str),
        Some("downstream_unavailable")
    );
    assert_eq!(
        flaky_letter
            .1
            .get(headers::DLQ_DELIVERIES)
            .map(String::as_str),
        Some("3")
    );
    let poison_letter = letters
        .iter()
        .find(|(_, h, _)| h.get(headers::DLQ_EVENT_ID).map(String::as_str) == Some("evt-poison"))
        .unwrap();
    assert_eq!(
        poison_letter.1.get(headers::DLQ_ERROR).map(String::as_str),
        Some("no order o9")
    );

    let outcomes: Vec<_> = w
        .audited_on(w.subject("flaky").as_str())
        .iter()
        .map(|e| (e.decision, e.reason, e.message.as_ref().unwrap().outcome))
        .collect();
    let retry = (
        AuditDecision::Allow,
        Some("downstream_unavailable"),
        MessageOutcome::Retry,
    );
    let dead = (
        AuditDecision::Allow,
        Some("downstream_unavailable"),
        MessageOutcome::DeadLettered,
    );
    assert_eq!(
        outcomes,
        [retry, retry, dead],
        "one audit event per delivery"
    );
    stop.cancel();
    running.await.unwrap();
}

/// A handler that waits for permits, counting how many run at once.
#[derive(Clone)]
struct Gate {
    open: Arc<Semaphore>,
    running: Arc<AtomicU64>,
    most: Arc<AtomicU64>,
    done: Arc<AtomicU64>,
}

impl Default for Gate {
    fn default() -> Self {
        Self {
            open: Arc::new(Semaphore::new(0)),
            running: Arc::default(),
            most: Arc::default(),
            done: Arc::default(),
        }
    }
}

impl Gate {
    fn consumer(&self, w: &World, config: &MessagingConfig) -> Consumer {
        let gate = self.clone();
        Consumer::builder(w.nats.client(), config, &w.mail, w.subscription())
            .verifier(w.issuer.verifier())
            .auditor(w.auditor.clone())
            .handler(move |_: Message<Value>| {
                let gate = gate.clone();
                async move {
                    let now = gate.running.fetch_add(1, Ordering::SeqCst) + 1;
                    gate.most.fetch_max(now, Ordering::SeqCst);
                    gate.open.acquire().await.unwrap().forget();
                    gate.running.fetch_sub(1, Ordering::SeqCst);
                    gate.done.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            })
            .build()
            .unwrap()
    }
}

async fn publish_many(w: &World, publisher: &Publisher, n: usize) {
    for i in 0..n {
        let event =
            OutgoingEvent::json(w.subject("acme"), &format!("evt-{i}"), &json!({})).unwrap();
        publisher.publish(&event).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_flight_bound_holds_with_a_slow_handler() {
    let Some(w) = World::new("in flight").await else {
        return;
    };
    let config = MessagingConfig {
        max_in_flight: 3,
        ..fast(&w.nats)
    };
    let publisher = w.publisher(&config, &w.token(&[&w.grant("acme")])).await;
    publish_many(&w, &publisher, 12).await;
    let gate = Gate::default();
    let consumer = gate.consumer(&w, &config);
    let stop = CancellationToken::new();
    let running = tokio::spawn(consumer.clone().run(stop.clone()));
    eventually("three handlers running", || async {
        gate.running.load(Ordering::SeqCst) == 3
    })
    .await;
    // Held there: no fourth starts while the three wait.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(gate.running.load(Ordering::SeqCst), 3);
    assert_eq!(consumer.in_flight(), 3);
    gate.open.add_permits(12);
    eventually("all handled", || async {
        gate.done.load(Ordering::SeqCst) == 12
    })
    .await;
    assert_eq!(
        gate.most.load(Ordering::SeqCst),
        3,
        "never more than the bound at once"
    );
    stop.cancel();
    running.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_shows_in_the_metric_and_readiness() {
    let Some(w) = World::new("lag").await else {
        return;
    };
    let config = MessagingConfig {
        max_in_flight: 1,
        max_lag: 2,
        ..fast(&w.nats)
    };
    let publisher = w.publisher(&config, &w.token(&[&w.grant("acme")])).await;
    let gate = Gate::default();
    let consumer = gate.consumer(&w, &config);
    let (name, check, _) = consumer.health_check();
    assert_eq!(name, format!("nats:{}", consumer.name()));
    assert!(
        check.check().await.is_err(),
        "not ready before it has started"
    );

    let stop = CancellationToken::new();
    let running = tokio::spawn(consumer.clone().run(stop.clone()));
    eventually("ready when idle", || async { check.check().await.is_ok() }).await;
    publish_many(&w, &publisher, 6).await;
    eventually("lag in the gauge", || async {
        gauge("messaging_consumer_lag", consumer.name()) == Some(6.0)
    })
    .await;
    let refused = check.check().await.unwrap_err();
    assert!(refused.message().contains("lag 6 above 2"), "{refused}");
    assert_eq!(consumer.lag(), Some(6));

    gate.open.add_permits(6);
    eventually("drained, ready again", || async {
        gate.done.load(Ordering::SeqCst) == 6 && check.check().await.is_ok()
    })
    .await;
    assert_eq!(gauge("messaging_consumer_lag", consumer.name()), Some(0.0));
    stop.cancel();
    running.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_not_ready() {
    let Some(w) = World::new("unreachable").await else {
        return;
    };
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("nats://{}", closed.local_addr().unwrap());
    drop(closed);
    let config = MessagingConfig::new(&url);
    let client = config.connect("mail").await.unwrap();
    let consumer = Consumer::builder(client, &config, &w.mail, w.subscription())
        .verifier(w.issuer.verifier())
        .handler(|_: Message<Value>| async { Ok(()) })
        .build()
        .unwrap();
    let (_, check, _) = consumer.health_check();
    let down = check.check().await.unwrap_err();
    assert_eq!(down.message(), "broker unreachable");
    // Running against it neither spins nor ends until stopped.
    let stop = CancellationToken::new();
    let running = tokio::spawn(consumer.run(stop.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!running.is_finished());
    stop.cancel();
    running.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_the_message_in_hand() {
    let Some(w) = World::new("shutdown").await else {
        return;
    };
    let config = fast(&w.nats);
    let publisher = w.publisher(&config, &w.token(&[&w.grant("acme")])).await;
    publish_many(&w, &publisher, 1).await;
    let gate = Gate::default();
    let consumer = gate.consumer(&w, &config);
    let stop = CancellationToken::new();
    let running = tokio::spawn(consumer.clone().run(stop.clone()));
    eventually("the handler running", || async {
        gate.running.load(Ordering::SeqCst) == 1
    })
    .await;
    stop.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!running.is_finished(), "it waits for the message in hand");
    gate.open.add_permits(1);
    running.await.unwrap();
    assert_eq!(gate.done.load(Ordering::SeqCst), 1);
    let subject = w.subject("acme").to_string();
    let audited = w.audited_on(&subject);
    assert_eq!(audited.len(), 1);
    assert_eq!(
        audited[0].message.as_ref().unwrap().outcome,
        MessageOutcome::Processed
    );
}

#[tokio::test]
async fn undeclared_access_stops_the_build() {
    let Some(w) = World::new("deny by default").await else {
        return;
    };
    let config = w.nats.config();
    let build = |s: Subscription, verifier: Option<Verifier>| {
        let mut b = Consumer::builder(w.nats.client(), &config, &w.mail, s)
            .handler(|_: Message<Value>| async { Ok(()) });
        if let Some(v) = verifier {
            b = b.verifier(v);
        }
        match b.build() {
            Err(MessagingError::Declaration(problems)) => problems.join("\n"),
            other => panic!("built: {other:?}"),
        }
    };
    let undeclared = build(Subscription::new(&w.orders, 1, "order.placed"), None);
    assert!(undeclared.contains("denied by default"), "{undeclared}");
    let placeholder = build(
        Subscription::new(&w.orders, 1, "order.placed").requires("mail:{account}:send:{kind}"),
        Some(w.issuer.verifier()),
    );
    assert!(placeholder.contains("{kind}"), "{placeholder}");
    let no_verifier = build(w.subscription(), None);
    assert!(no_verifier.contains("no token verifier"), "{no_verifier}");
    let bad = build(
        Subscription::new("Orders", 0, "order..placed").public(),
        None,
    );
    for what in ["publisher", "versions", "event name"] {
        assert!(bad.contains(what), "{what}: {bad}");
    }
    // Public needs no verifier, and builds.
    Consumer::builder(
        w.nats.client(),
        &config,
        &w.mail,
        Subscription::new(&w.orders, 1, "order.placed").public(),
    )
    .handler(|_: Message<Value>| async { Ok(()) })
    .build()
    .unwrap();
}

/// The connection to the broker drops and comes back: the consumer turns
/// unready, then resumes, and what was published meanwhile is processed
/// once; a publish that got no ack while the connection was down is
/// published again by its relay and dropped as a duplicate if it had
/// arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_broker_connection_is_resumed_and_nothing_is_lost_or_doubled() {
    let Some(w) = World::new("connection dropped").await else {
        return;
    };
    let broker: std::net::SocketAddr = w
        .nats
        .url()
        .trim_start_matches("nats://")
        .parse()
        .expect("the test broker's URL is host:port");
    let proxy = TcpProxy::start(broker).await;
    let config = fast(&w.nats);
    let proxied = MessagingConfig::new(&format!("nats://{}", proxy.addr()));
    let token = w.token(&[&w.grant("acme")]);
    let direct = w.publisher(&config, &token).await;
    let through = Publisher::new(
        proxied.connect(&w.orders).await.unwrap(),
        &config,
        &w.orders,
        &[1],
        StaticToken::bearer(&token),
    )
    .await
    .unwrap();
    let seen = Seen::default();
    let consumer = w.consumer_on(
        proxied.connect(&w.mail).await.unwrap(),
        &config,
        w.issuer.verifier(),
        seen.clone(),
    );
    let (_, ready, _) = consumer.health_check();
    let stop = CancellationToken::new();
    let running = tokio::spawn(consumer.clone().run(stop.clone()));
    let event = |id: &str| OutgoingEvent::json(w.subject("acme"), id, &json!({})).unwrap();

    direct.publish(&event("before")).await.unwrap();
    eventually("the first event processed", || async {
        seen.count("before") == 1
    })
    .await;
    eventually("ready", || async { ready.check().await.is_ok() }).await;

    proxy.cut();
    eventually("unready while the broker is out of reach", || async {
        ready.check().await.is_err()
    })
    .await;
    // The broker itself is up: others publish while this service is cut off.
    for id in ["during-1", "during-2"] {
        direct.publish(&event(id)).await.unwrap();
    }
    // This service's own publish gets no ack; its relay keeps the event.
    let unacked = through.publish(&event("unacked")).await;
    assert!(unacked.is_err(), "no ack through a cut connection");
    assert_eq!(seen.count("during-1"), 0);

    proxy.restore();
    // The relay publishes the event again; whether the first attempt
    // reached the stream or not, it is in the stream once.
    eventually("the relay's publish acked after the restore", || async {
        through.publish(&event("unacked")).await.is_ok()
    })
    .await;
    eventually("what was published meanwhile processed", || async {
        ["during-1", "during-2", "unacked"]
            .iter()
            .all(|id| seen.count(id) == 1)
    })
    .await;
    eventually("ready again", || async { ready.check().await.is_ok() }).await;
    assert!(proxy.connections() >= 4, "both clients reconnected");

    // A last event, after which nothing older can still be in flight.
    direct.publish(&event("after")).await.unwrap();
    eventually("the last event processed", || async {
        seen.count("after") == 1
    })
    .await;
    for id in ["before", "during-1", "during-2", "unacked", "after"] {
        assert_eq!(seen.count(id), 1, "{id} processed exactly once");
    }
    stop.cancel();
    running.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_gives_each_system_its_own_streams_on_one_server() {
    let Some(w) = World::new("prefix").await else {
        return;
    };
    // CHASSIS_NATS_PREFIX, as a service reads it: this test's prefix names
    // the same services as TestNats does.
    let env = chassis::config::Env::from_pairs([
        ("CHASSIS_NATS_URL", w.nats.url()),
        ("CHASSIS_NATS_PREFIX", w.nats.prefix()),
        ("CHASSIS_NATS_LAG_POLL_MS", "100"),
    ]);
    let mut r = chassis::config::Reader::new(&env);
    let config = MessagingConfig::read(&mut r).unwrap();
    r.finish().unwrap();
    assert_eq!(config.name("orders"), w.orders);
    assert_eq!(config.name("mail"), w.mail);
    assert_eq!(w.nats.config().name("orders"), w.orders);

    // Another system on the same server: same services, another prefix.
    let other = TestNats::or_skip("prefix (other)").await.unwrap();
    let other_config = other.config();
    let other_orders = other_config.name("orders");
    let token = w.issuer.service_token(
        &other_orders,
        &[&format!("{}:acme:send:message", other_config.name("mail"))],
    );
    let other_publisher = Publisher::new(
        other.client(),
        &other_config,
        &other_orders,
        &[1],
        StaticToken::bearer(&token),
    )
    .await
    .unwrap();
    let other_subject = Subject::new(
        &other_orders,
        1,
        &AccountId::parse("acme").unwrap(),
        "order.placed",
    )
    .unwrap();
    let theirs = other_publisher
        .publish(&OutgoingEvent::json(other_subject, "evt-theirs", &json!({})).unwrap())
        .await
        .unwrap();
    assert_eq!(theirs.stream, format!("{other_orders}-events"));

    let publisher = w.publisher(&config, &w.token(&[&w.grant("acme")])).await;
    let seen = Seen::default();
    let consumer = w.consumer(&config, w.issuer.verifier(), seen.clone());
    let stop = CancellationToken::new();
    let running = tokio::spawn(consumer.clone().run(stop.clone()));
    let ours = OutgoingEvent::json(w.subject("acme"), "evt-ours", &json!({})).unwrap();
    assert_eq!(
        publisher.publish(&ours).await.unwrap().stream,
        format!("{}-events", w.orders)
    );
    eventually("ours processed", || async { seen.count("evt-ours") == 1 }).await;
    // The other system's event stays in its own stream, untouched.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(seen.all().len(), 1, "{:?}", seen.all());
    stop.cancel();
    running.await.unwrap();

    // A prefix outside its grammar is a problem of the configuration.
    for bad in ["Demo", "1demo", "a.b", &"a".repeat(33)] {
        let env = chassis::config::Env::from_pairs([
            ("CHASSIS_NATS_URL", "nats://127.0.0.1:4222"),
            ("CHASSIS_NATS_PREFIX", bad),
        ]);
        let mut r = chassis::config::Reader::new(&env);
        let _ = MessagingConfig::read(&mut r);
        let e = r.finish().unwrap_err().to_string();
        assert!(e.contains("CHASSIS_NATS_PREFIX"), "{bad:?}: {e}");
    }
}
