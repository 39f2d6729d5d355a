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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_order_is_one_trace_across_orders_ticketing_the_relay_and_mail() {
    let receiver = OtlpReceiver::start().await;
    let env = otel_env(&receiver.endpoint());
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();

    // This test is the customer: its calls' attempts are the trace's roots.
    let settings = {
        let vars = Env::from_pairs(env_refs.iter().copied());
        let mut r = Reader::new(&vars);
        let settings = TraceSettings::read(&mut r);
        r.finish().expect("valid OTEL_* settings");
        settings
    };
    let pipeline = chassis::otel::install(
        &settings,
        ResourceInfo {
            service_name: "customer".to_owned(),
            service_version: "test".to_owned(),
            instance_id: chassis::otel::instance_id(),
        },
    )
    .expect("an endpoint is set");

    let data = temp_dir("tracing");
    let mut system = System::start_with_env(&exe(), &data, Ports::free().unwrap(), &env_refs)
        .await
        .expect("the system starts");
    let e = system.endpoints();
    let admin = alice(&e, "ticketing").await;
    let ticket = product(&e, &admin, 10).await;
    // The order, in a trace of its own whose root is the customer's span.
    let journey = Span::internal(&TraceContext::new_unrecorded_root(), "place an order");
    let cx = alice(&e, "orders")
        .await
        .with_trace(journey.trace().clone());
    let trace_id = cx.correlation().trace().trace_id().to_string();
    let orders = OrdersClient::new(downstream("orders", &e.orders));
    let order = place(&orders, &cx, &ticket, "trace-1").await;
    every_order_mailed_once(&data, &HashSet::from([order.clone()])).await;

    journey.end();
    // Every hop exports; stopping the services sends what each has queued.
    chassis::testing::eventually_within(
        Duration::from_secs(60),
        "mail's send span to arrive",
        || {
            let done = receiver
                .spans()
                .iter()
                .any(|s| s.trace_id == trace_id && s.service_name == "mail" && s.kind == "client");
            async move { done }
        },
    )
    .await;
    system.stop().await;
    pipeline.shutdown(Duration::from_secs(5)).await;
    let spans: Vec<ReceivedSpan> = receiver
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
    let relayed = find("orders", "consumer", "outbox deliver order.placed");
    assert_eq!(parent_of(relayed).span_id, transaction.span_id);
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
        let lines = lines_of(&data, service, &trace_id);
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
    let _ = std::fs::remove_dir_all(&data);
}
