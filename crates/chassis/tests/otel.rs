//! Spans a service exports, decoded by a real OTLP receiver on loopback:
//! the server span of each request, a client span per attempt at a call,
//! the `traceparent` each attempt sends, and sampling.
//!
//! The export pipeline is the process's own, so the tests of this file take
//! turns.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{extract::State, http::StatusCode};
use chassis::{
    api::{self, Api},
    client::{CallContext, Downstream},
    config::{Config, Env, Reader},
    context::TraceContext,
    otel::TraceSettings,
    service::ServiceBuilder,
    testing::{OtlpReceiver, ReceivedSpan, TestServer},
};
use tokio::{net::TcpListener, sync::Mutex};

/// One test at a time: the pipeline and the sampling are the process's.
static TURN: Mutex<()> = Mutex::const_new(());

fn config(otel: &[(&str, &str)]) -> Config {
    let env = Env::from_pairs(otel.iter().copied());
    let mut r = Reader::new(&env);
    let tracing = TraceSettings::read(&mut r);
    r.finish().expect("the OTEL_* settings are valid");
    let mut c = Config::default();
    c.tracing = tracing;
    c
}

/// `front` serves `GET /call`, which calls its own `GET /flaky` through a
/// downstream that retries once; `/flaky` answers 503 the first time and
/// 200 after.
async fn front(otel: &[(&str, &str)]) -> (TestServer, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let downstream = Downstream::builder("self", &url)
        .max_attempts(2)
        .backoff(Duration::from_millis(1), Duration::from_millis(2))
        .retry_budget(1.0)
        .build()
        .unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let api =
        Api::new()
            .route(
                api::get(
                    "/call",
                    |State((downstream, _)): State<(Downstream, Arc<AtomicUsize>)>,
                     cx: CallContext| async move {
                        match downstream
                            .anonymous(&cx)
                            .get("/front/v1/flaky")
                            .retry_safe()
                            .send()
                            .await
                        {
                            Ok(_) => StatusCode::OK,
                            Err(_) => StatusCode::BAD_GATEWAY,
                        }
                    },
                )
                .public()
                .undocumented("a test route"),
            )
            .route(
                api::get(
                    "/flaky",
                    |State((_, hits)): State<(Downstream, Arc<AtomicUsize>)>| async move {
                        if hits.fetch_add(1, Ordering::SeqCst) == 0 {
                            StatusCode::SERVICE_UNAVAILABLE
                        } else {
                            StatusCode::OK
                        }
                    },
                )
                .public()
                .undocumented("a test route"),
            )
            .with_state((downstream, hits.clone()));
    let builder = ServiceBuilder::new("front", 1)
        .api(api)
        .config(config(otel));
    (TestServer::start_on(builder, listener).await, hits)
}

fn of_trace(receiver: &OtlpReceiver, trace_id: &str) -> Vec<ReceivedSpan> {
    receiver
        .spans()
        .into_iter()
        .filter(|s| s.trace_id == trace_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_with_a_retry_is_one_trace_with_a_span_per_attempt() {
    let _turn = TURN.lock().await;
    let receiver = OtlpReceiver::start().await;
    let endpoint = receiver.endpoint();
    let (server, hits) = front(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "10"),
    ])
    .await;
    // The test's own call: its attempt is the trace's root.
    let cx = CallContext::background();
    let trace_id = cx.correlation().trace().trace_id().to_string();
    let calls = server.downstream();
    let res = calls
        .anonymous(&cx)
        .get("/front/v1/call")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        hits.load(Ordering::SeqCst),
        2,
        "one failed attempt, one retry"
    );
    let flaky_url = server.url("/front/v1/flaky");
    // Stopping sends what is queued.
    server.stop().await;
    let spans = of_trace(&receiver, &trace_id);
    let describe = || {
        spans
            .iter()
            .map(|s| {
                format!(
                    "{} {} {} <- {:?}",
                    s.kind, s.name, s.span_id, s.parent_span_id
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(spans.len(), 6, "{}", describe());
    let by_id = |id: &str| spans.iter().find(|s| s.span_id == id);
    for s in &spans {
        if let Some(parent) = &s.parent_span_id {
            assert!(
                by_id(parent).is_some(),
                "{} misses its parent:\n{}",
                s.name,
                describe()
            );
        }
    }
    let root = spans.iter().find(|s| s.parent_span_id.is_none()).unwrap();
    assert_eq!((root.kind, root.name.as_str()), ("client", "GET"));
    let call = spans
        .iter()
        .find(|s| s.kind == "server" && s.name == "GET /front/v1/call")
        .unwrap_or_else(|| panic!("{}", describe()));
    assert_eq!(call.parent_span_id.as_deref(), Some(root.span_id.as_str()));
    assert_eq!(call.attributes["http.request.method"], "GET");
    assert_eq!(call.attributes["http.route"], "/front/v1/call");
    assert_eq!(call.attributes["http.response.status_code"], 200);
    assert_eq!(call.attributes["url.scheme"], "http");
    assert_eq!(call.attributes["server.address"], "127.0.0.1");
    // Two attempts, each a client span under the handler's server span,
    // each the parent of the server span it reached.
    let attempts: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| {
            s.kind == "client" && s.parent_span_id.as_deref() == Some(call.span_id.as_str())
        })
        .collect();
    assert_eq!(attempts.len(), 2, "{}", describe());
    let mut statuses = Vec::new();
    for attempt in &attempts {
        assert_eq!(attempt.attributes["peer.service"], "self");
        assert_eq!(attempt.attributes["url.full"], flaky_url.as_str());
        let reached = spans
            .iter()
            .find(|s| {
                s.kind == "server" && s.parent_span_id.as_deref() == Some(attempt.span_id.as_str())
            })
            .unwrap_or_else(|| panic!("no server span under {}:\n{}", attempt.span_id, describe()));
        assert_eq!(reached.name, "GET /front/v1/flaky");
        assert_eq!(
            reached.attributes["http.response.status_code"],
            attempt.attributes["http.response.status_code"]
        );
        statuses.push((
            attempt.attributes["http.response.status_code"].clone(),
            attempt.status,
            reached.status,
        ));
    }
    statuses.sort_by_key(|s| s.0.as_i64());
    assert_eq!(
        statuses,
        vec![
            (serde_json::json!(200), "unset", "unset"),
            (serde_json::json!(503), "error", "error"),
        ]
    );
    let failed = spans
        .iter()
        .find(|s| s.kind == "client" && s.status == "error")
        .unwrap();
    assert_eq!(failed.attributes["error.type"], "503");
    // Every span names the service's resource.
    for s in &spans {
        assert_eq!(s.service_name, "front");
        assert!(s.resource.contains_key("service.instance.id"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ratio_of_zero_records_nothing_the_service_starts_but_follows_a_sampled_caller() {
    let _turn = TURN.lock().await;
    let receiver = OtlpReceiver::start().await;
    let endpoint = receiver.endpoint();
    let (server, _) = front(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_TRACES_SAMPLER_ARG", "0"),
        ("OTEL_BSP_SCHEDULE_DELAY", "10"),
    ])
    .await;
    let calls = server.downstream();
    // Started here, at ratio 0: not sampled, and the calls it makes ask
    // nobody to record.
    let unsampled = CallContext::background();
    assert!(!unsampled.correlation().trace().sampled());
    calls
        .anonymous(&unsampled)
        .get("/front/v1/call")
        .send()
        .await
        .unwrap();
    // A caller that sampled its trace: every hop records.
    let parent = TraceContext::from_traceparent(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        None,
    )
    .unwrap();
    let sampled = CallContext::background().with_trace(parent);
    calls
        .anonymous(&sampled)
        .get("/front/v1/call")
        .send()
        .await
        .unwrap();
    server.stop().await;
    let trace_id = unsampled.correlation().trace().trace_id().to_string();
    assert!(
        of_trace(&receiver, &trace_id).is_empty(),
        "nothing of the unsampled trace"
    );
    let followed = of_trace(&receiver, "4bf92f3577b34da6a3ce929d0e0e4736");
    // The test's attempt, the call, its one attempt at /flaky (which
    // answers 200 by now) and /flaky.
    let kinds: Vec<(&str, &str)> = followed.iter().map(|s| (s.kind, s.name.as_str())).collect();
    assert_eq!(followed.len(), 4, "{kinds:?}");
    let first = followed
        .iter()
        .find(|s| s.kind == "client" && s.parent_span_id.as_deref() == Some("00f067aa0ba902b7"));
    assert!(
        first.is_some(),
        "the first hop is the caller's child: {kinds:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_hangs_slows_no_request_and_the_spans_it_loses_are_counted() {
    let _turn = TURN.lock().await;
    let receiver = OtlpReceiver::start().await;
    receiver.set_stalling(true);
    let endpoint = receiver.endpoint();
    let (server, _) = front(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "4"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "2"),
        ("OTEL_BSP_SCHEDULE_DELAY", "10"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "60000"),
    ])
    .await;
    let calls = server.downstream();
    // Each request records four spans or more (the test's attempt, the
    // call, its attempts and what they reach): the first batch hangs at the
    // collector, the queue fills, and every request after is still
    // answered, its spans dropped.
    for _ in 0..50 {
        let cx = CallContext::background();
        let answered = tokio::time::timeout(
            Duration::from_secs(30),
            calls.anonymous(&cx).get("/front/v1/call").send(),
        )
        .await
        .expect("a hanging collector does not hold up a request");
        assert_eq!(answered.unwrap().status(), 200);
    }
    let metrics = calls
        .anonymous(&CallContext::background())
        .get("/metrics")
        .send()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(metrics.body()).into_owned();
    let dropped: f64 = text
        .lines()
        .find(|l| l.starts_with("otel_spans_dropped_total") && l.contains("reason=\"queue_full\""))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no queue_full drops in:\n{text}"));
    assert!(dropped >= 150.0, "dropped {dropped}");
    receiver.set_stalling(false);
    server.stop().await;
}
