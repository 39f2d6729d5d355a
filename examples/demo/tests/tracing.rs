//! One order placed through the four services, traced: the spans each
//! service exports reach a real OTLP receiver on loopback, and together
//! they are one trace with no span whose parent is missing, from the
//! customer's call through orders, ticketing, the outbox relay and mail to
//! the hand-over of the message.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    path::Path,
    time::Duration,
};

use chassis::{
    config::{Env, Reader},
    context::TraceContext,
    otel::{ResourceInfo, Span, TraceSettings},
    testing::{OtlpReceiver, ReceivedSpan},
};
use demo::system::{Ports, System};
use orders::OrdersClient;

mod support;

use support::*;

/// One test at a time: the customer's pipeline is the process's.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The customer's own export pipeline (this test process), to `endpoint`:
/// its calls' spans are recorded too.
fn customer(env: &[(&str, &str)]) -> chassis::otel::Tracing {
    let vars = Env::from_pairs(env.iter().copied());
    let mut r = Reader::new(&vars);
    let settings = TraceSettings::read(&mut r);
    r.finish().expect("valid OTEL_* settings");
    chassis::otel::install(
        &settings,
        ResourceInfo {
            service_name: "customer".to_owned(),
            service_version: "test".to_owned(),
            instance_id: chassis::otel::instance_id(),
        },
    )
    .expect("an endpoint is set")
}

/// What the services and this test are told: export to `endpoint`, in
/// batches a few milliseconds apart.
fn otel_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.to_owned()),
        ("OTEL_BSP_SCHEDULE_DELAY", "50".to_owned()),
    ]
}

/// The log lines of `service` that carry `trace_id`.
fn lines_of(data: &Path, service: &str, trace_id: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(data.join("logs").join(format!("{service}.log")))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["trace_id"] == trace_id)
        .collect()
}

/// A running system whose services export to `receiver`, and this test's
/// own pipeline (the customer's), with a product of `capacity` places.
struct Traced {
    receiver: OtlpReceiver,
    pipeline: chassis::otel::Tracing,
    system: System,
    data: std::path::PathBuf,
    ticket: String,
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

async fn traced(name: &str, capacity: u32) -> Traced {
    let receiver = OtlpReceiver::start().await;
    let env = otel_env(&receiver.endpoint());
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let turn = TURN.lock().await;
    // This test is the customer: its spans are the trace's roots.
    let pipeline = customer(&env_refs);
    let data = temp_dir(name);
    let system = System::start_with_env(&exe(), &data, Ports::free().unwrap(), &env_refs)
        .await
        .expect("the system starts");
    let e = system.endpoints();
    let admin = alice(&e, "ticketing").await;
    let ticket = product(&e, &admin, capacity).await;
    Traced {
        receiver,
        pipeline,
        system,
        data,
        ticket,
        _turn: turn,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_order_is_one_trace_across_orders_ticketing_the_relay_and_mail() {
    let mut t = traced("tracing", 10).await;
    let e = t.system.endpoints();
    // The order, in a trace of its own whose root is the customer's span.
    let journey = Span::internal(&TraceContext::new_unrecorded_root(), "place an order");
    let cx = alice(&e, "orders")
        .await
        .with_trace(journey.trace().clone());
    let trace_id = cx.correlation().trace().trace_id().to_string();
    let orders = OrdersClient::new(downstream("orders", &e.orders));
    let order = place(&orders, &cx, &t.ticket, "trace-1").await;
    every_order_mailed_once(&t.data, &HashSet::from([order.clone()])).await;

    journey.end();
    // Every hop exports; stopping the services sends what each has queued.
    chassis::testing::eventually_within(
        Duration::from_secs(60),
        "mail's send span to arrive",
        || {
            let done =
                t.receiver.spans().iter().any(|s| {
                    s.trace_id == trace_id && s.service_name == "mail" && s.kind == "client"
                });
            async move { done }
        },
    )
    .await;
    t.system.stop().await;
    t.pipeline.shutdown(Duration::from_secs(5)).await;
    let spans: Vec<ReceivedSpan> = t
        .receiver
        .spans()
        .into_iter()
        .filter(|s| s.trace_id == trace_id)
        .collect();
    let by_id: BTreeMap<&str, &ReceivedSpan> =
        spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let describe = || {
        spans
            .iter()
            .map(|s| {
                format!(
                    "{} {} {} {} <- {:?}",
                    s.service_name, s.kind, s.name, s.span_id, s.parent_span_id
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    // No span names a parent that was not exported, and there is one root.
    for s in &spans {
        if let Some(parent) = &s.parent_span_id {
            assert!(
                by_id.contains_key(parent.as_str()),
                "{} has a missing parent:\n{}",
                s.name,
                describe()
            );
        }
    }
    let roots: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.parent_span_id.is_none())
        .collect();
    assert_eq!(roots.len(), 1, "one root:\n{}", describe());
    assert_eq!(roots[0].service_name, "customer");
    assert_eq!(
        (roots[0].kind, roots[0].name.as_str()),
        ("internal", "place an order")
    );

    // Each hop is there, under the one before it.
    let find = |service: &str, kind: &str, name: &str| -> &ReceivedSpan {
        spans
            .iter()
            .find(|s| s.service_name == service && s.kind == kind && s.name == name)
            .unwrap_or_else(|| panic!("no {kind} span {name} of {service}:\n{}", describe()))
    };
    let parent_of = |s: &ReceivedSpan| -> &ReceivedSpan {
        by_id[s.parent_span_id.as_deref().expect("a parent")]
    };
    let placed = find("orders", "server", "POST /orders/v1/{account}/orders");
    let customer_call = parent_of(placed);
    assert_eq!(
        (customer_call.service_name.as_str(), customer_call.kind),
        ("customer", "client")
    );
    assert_eq!(parent_of(customer_call).span_id, roots[0].span_id);
    assert_eq!(
        placed.attributes["http.response.status_code"],
        serde_json::json!(201)
    );
    assert_eq!(
        placed.attributes["http.route"],
        "/orders/v1/{account}/orders"
    );
    let reserve = find(
        "ticketing",
        "server",
        "POST /ticketing/v1/{account}/reservations",
    );
    let reserve_call = parent_of(reserve);
    assert_eq!(
        (reserve_call.service_name.as_str(), reserve_call.kind),
        ("orders", "client")
    );
    assert_eq!(parent_of(reserve_call).span_id, placed.span_id);
    let transaction = find("orders", "client", "place order");
    assert_eq!(parent_of(transaction).span_id, placed.span_id);
    assert_eq!(transaction.attributes["db.system.name"], "sqlite");
    find("ticketing", "client", "reserve");
    // The relay continues the trace from the transaction that stored the
    // events, as its child.
    assert_eq!(
        parent_of(find("orders", "client", "claim key")).span_id,
        placed.span_id
    );
    let relayed = find("orders", "consumer", "outbox deliver order.placed");
    assert_eq!(parent_of(relayed).span_id, transaction.span_id);
    // Each delivery records its outcome in a transaction under it.
    assert!(spans.iter().any(|s| s.name == "record delivery"
        && s.parent_span_id.as_deref() == Some(relayed.span_id.as_str())));
    let confirming = find("orders", "consumer", "outbox deliver reservation.confirm");
    let confirmed = find(
        "ticketing",
        "server",
        "POST /ticketing/v1/{account}/reservations/{id}/confirm",
    );
    assert_eq!(parent_of(parent_of(confirmed)).span_id, confirming.span_id);
    assert_eq!(
        parent_of(find("ticketing", "client", "confirm")).span_id,
        confirmed.span_id
    );
    let queued = find("mail", "server", "POST /mail/v1/messages");
    assert_eq!(parent_of(parent_of(queued)).span_id, relayed.span_id);
    // Mail's worker continues from the request that queued the message.
    let delivered = spans
        .iter()
        .find(|s| s.service_name == "mail" && s.kind == "consumer")
        .unwrap_or_else(|| panic!("no mail worker span:\n{}", describe()));
    assert_eq!(parent_of(delivered).span_id, queued.span_id);
    let sent = spans
        .iter()
        .find(|s| s.service_name == "mail" && s.kind == "client")
        .unwrap_or_else(|| panic!("no mail send span:\n{}", describe()));
    assert_eq!(parent_of(sent).span_id, delivered.span_id);
    // The resource names each service's instance.
    for s in &spans {
        assert!(
            !s.resource["service.instance.id"]
                .as_str()
                .unwrap_or_default()
                .is_empty()
        );
        assert!(
            s.resource.contains_key("service.version"),
            "{:?}",
            s.resource
        );
    }

    // Each service's log lines for this trace carry the trace id and the
    // id of a span that service exported in it.
    for service in ["orders", "ticketing", "mail"] {
        let lines = lines_of(&t.data, service, &trace_id);
        assert!(!lines.is_empty(), "{service} logged nothing for the trace");
        let own: BTreeSet<&str> = spans
            .iter()
            .filter(|s| s.service_name == service)
            .map(|s| s.span_id.as_str())
            .collect();
        for line in &lines {
            let span_id = line["span_id"]
                .as_str()
                .unwrap_or_else(|| panic!("a line of {service} without span_id: {line}"));
            assert!(
                own.contains(span_id),
                "{service} logged span {span_id}, which it did not export: {line}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&t.data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_that_fails_once_shows_each_attempt_as_a_span() {
    let mut t = traced("tracing-retry", 100).await;
    let e = t.system.endpoints();
    // Ticketing refuses a share of reservations (503), as a flaky
    // dependency would; orders retries them (they carry an Idempotency-Key).
    t.system
        .restart_with(
            "ticketing",
            &[
                ("CHASSIS_FAULT_ABORT_PERCENT", "30"),
                (
                    "CHASSIS_FAULT_ROUTES",
                    "/ticketing/v1/{account}/reservations",
                ),
            ],
        )
        .await
        .expect("ticketing restarts");
    let orders = OrdersClient::new(downstream("orders", &e.orders));
    let cx = alice(&e, "orders").await;
    // Orders until one's first reservation attempt fails and a retry
    // succeeds (30 % each: 40 orders miss that with odds below 10^-4).
    let mut traces = Vec::new();
    for i in 0..40 {
        let journey = Span::internal(&TraceContext::new_unrecorded_root(), "place an order");
        let cx = cx.clone().with_trace(journey.trace().clone());
        traces.push(cx.correlation().trace().trace_id().to_string());
        place(&orders, &cx, &t.ticket, &format!("retry-{i}")).await;
        journey.end();
    }
    t.system.stop().await;
    t.pipeline.shutdown(Duration::from_secs(5)).await;
    let spans = t.receiver.spans();
    let retried = traces.iter().find_map(|trace_id| {
        let of_trace: Vec<&ReceivedSpan> =
            spans.iter().filter(|s| &s.trace_id == trace_id).collect();
        let placed = of_trace.iter().find(|s| {
            s.service_name == "orders"
                && s.kind == "server"
                && s.attributes["http.response.status_code"] == serde_json::json!(201)
        })?;
        let attempts: Vec<&ReceivedSpan> = of_trace
            .iter()
            .copied()
            .filter(|s| {
                s.service_name == "orders"
                    && s.kind == "client"
                    && s.name == "POST"
                    && s.parent_span_id.as_deref() == Some(placed.span_id.as_str())
            })
            .collect();
        (attempts.len() >= 2).then_some((of_trace, attempts))
    });
    let (of_trace, attempts) = retried.expect("one order's reservation was retried");
    // Each attempt is its own span under the order's server span, and the
    // one ticketing server span it reached is its child, with the same
    // status: the refused ones 503 (an error), the last 201.
    let mut statuses = Vec::new();
    for attempt in &attempts {
        let reached: Vec<&ReceivedSpan> = of_trace
            .iter()
            .copied()
            .filter(|s| {
                s.service_name == "ticketing"
                    && s.kind == "server"
                    && s.parent_span_id.as_deref() == Some(attempt.span_id.as_str())
            })
            .collect();
        assert_eq!(reached.len(), 1, "one server span per attempt");
        let status = attempt.attributes["http.response.status_code"].clone();
        assert_eq!(reached[0].attributes["http.response.status_code"], status);
        statuses.push((attempt.start_unix_nanos, status, attempt.status));
    }
    statuses.sort_by_key(|s| s.0);
    let last = statuses.pop().expect("attempts");
    assert_eq!((last.1, last.2), (serde_json::json!(201), "unset"));
    for (_, status, outcome) in statuses {
        assert_eq!((status, outcome), (serde_json::json!(503), "error"));
    }
    let _ = std::fs::remove_dir_all(&t.data);
}
