//! Trace export: the `OTEL_*` settings, and spans sent to a real OTLP/HTTP
//! collector on loopback (`OtlpReceiver`), refused, stalled or gone, with
//! the pipeline's counters read from a debugging recorder.
//!
//! The pipeline is installed for the whole process, so the tests that start
//! one take `SERIAL` first and never run at the same time.

use std::{
    collections::BTreeMap,
    str::FromStr,
    sync::{Mutex, OnceLock},
    time::Duration,
};

use chassis::{
    config::{Env, Reader},
    otel::{ResourceInfo, Sampler, TraceSettings, Tracing},
    testing::{OtlpReceiver, TestCert, TestPki, eventually},
};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use opentelemetry::{
    Context, KeyValue,
    trace::{
        Link, Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags,
        TraceId, TraceState, Tracer as _, TracerProvider as _,
    },
};
use serde_json::json;

const SERVICE: &str = "otel-test";
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER: &str = "00f067aa0ba902b7";

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The CA of the collector served over HTTPS, trusted by the chassis'
/// transport before any pipeline of this binary starts.
fn pki() -> &'static (TestPki, TestCert) {
    static PKI: OnceLock<(TestPki, TestCert)> = OnceLock::new();
    PKI.get_or_init(|| {
        let pki = TestPki::new("collector CA");
        let cert = pki.server_cert(&["localhost"]);
        assert!(
            pki.client_tls().install_global(),
            "the first outbound TLS of this binary"
        );
        (pki, cert)
    })
}

fn settings(pairs: &[(&str, &str)]) -> Result<TraceSettings, Vec<(String, String)>> {
    let env = Env::from_pairs(pairs.iter().copied());
    let mut r = Reader::new(&env);
    let settings = TraceSettings::read(&mut r);
    match r.finish() {
        Ok(()) => Ok(settings),
        Err(e) => Err(e
            .problems()
            .iter()
            .map(|p| (p.name.clone(), p.message.clone()))
            .collect()),
    }
}

fn resource() -> ResourceInfo {
    ResourceInfo {
        service_name: "orders".to_owned(),
        service_version: "1.4.2".to_owned(),
        instance_id: "orders-7f9c".to_owned(),
    }
}

/// The pipeline's counters, accumulated over snapshots (a snapshot resets
/// them), keyed `name` or `name{reason}`.
struct Counts {
    snapshotter: Snapshotter,
    totals: Mutex<BTreeMap<String, u64>>,
}

impl Counts {
    fn get(&self, key: &str) -> u64 {
        let mut totals = self.totals.lock().unwrap();
        for (k, _, _, v) in self.snapshotter.snapshot().into_vec() {
            let DebugValue::Counter(n) = v else { continue };
            let key = k.key();
            let service = key.labels().find(|l| l.key() == "service");
            assert_eq!(service.map(|l| l.value()), Some(SERVICE), "{key:?}");
            let name = match key.labels().find(|l| l.key() == "reason") {
                Some(reason) => format!("{}{{{}}}", key.name(), reason.value()),
                None => key.name().to_owned(),
            };
            *totals.entry(name).or_default() += n;
        }
        totals.get(key).copied().unwrap_or(0)
    }

    fn exported(&self) -> u64 {
        self.get("otel_spans_exported_total")
    }

    fn failures(&self) -> u64 {
        self.get("otel_export_failures_total")
    }

    fn dropped(&self, reason: &str) -> u64 {
        self.get(&format!("otel_spans_dropped_total{{{reason}}}"))
    }
}

/// Starts a pipeline for `pairs`, its counters on a recorder of its own.
fn start(pairs: &[(&str, &str)]) -> (Tracing, Counts) {
    pki();
    chassis::metrics::set_service_label(SERVICE);
    let settings = settings(pairs).expect("valid settings");
    let recorder = DebuggingRecorder::new();
    let counts = Counts {
        snapshotter: recorder.snapshotter(),
        totals: Mutex::default(),
    };
    let tracing = metrics::with_local_recorder(&recorder, || {
        Tracing::start(&settings, resource()).expect("an endpoint is set")
    });
    (tracing, counts)
}

/// Ends `n` spans named `name` through the provider's tracer; returns how
/// many `end` calls returned.
fn end_spans(tracing: &Tracing, name: &'static str, n: usize) -> usize {
    let tracer = tracing.provider().tracer("chassis-test");
    let mut returned = 0;
    for _ in 0..n {
        tracer.start(name).end();
        returned += 1;
    }
    returned
}

/// A port on loopback where nothing listens: connections are refused.
fn refusing_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

// === settings ===

#[test]
fn defaults_export_nothing() {
    let s = settings(&[]).unwrap();
    assert!(!s.exports());
    assert_eq!(s, TraceSettings::off());
    assert_eq!(s.endpoint(), None);
    assert_eq!(s.timeout(), Duration::from_secs(10));
    assert_eq!(s.sampler(), Sampler::ParentBasedTraceIdRatio(1.0));
    assert_eq!(s.max_queue_size(), 2048);
    assert_eq!(s.max_export_batch_size(), 512);
    assert_eq!(s.schedule_delay(), Duration::from_millis(1000));
    assert_eq!(s.service_name(), None);
    assert!(s.resource_attributes().is_empty());
    assert_eq!(s.header_names().count(), 0);
}

#[test]
fn every_variable_is_read() {
    type Check = fn(&TraceSettings);
    let table: &[(&[(&str, &str)], Check)] = &[
        (
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")],
            |s| {
                assert!(s.exports());
                assert_eq!(s.endpoint(), Some("http://collector:4318/v1/traces"));
            },
        ),
        (
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")],
            |s| {
                assert_eq!(s.endpoint(), Some("http://collector:4318/v1/traces"));
            },
        ),
        (
            &[(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "https://collector.example/otlp",
            )],
            |s| {
                assert_eq!(
                    s.endpoint(),
                    Some("https://collector.example/otlp/v1/traces")
                );
            },
        ),
        (
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
                (
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    "http://traces:9999/custom",
                ),
            ],
            |s| {
                assert_eq!(
                    s.endpoint(),
                    Some("http://traces:9999/custom"),
                    "verbatim, and wins"
                )
            },
        ),
        (&[("OTEL_EXPORTER_OTLP_ENDPOINT", "")], |s| {
            assert!(!s.exports(), "empty is unset");
        }),
        (
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
                ("OTEL_SDK_DISABLED", "TRUE"),
            ],
            |s| assert!(!s.exports()),
        ),
        (
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
                ("OTEL_SDK_DISABLED", "false"),
                ("OTEL_TRACES_EXPORTER", "otlp"),
            ],
            |s| assert!(s.exports()),
        ),
        (
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
                ("OTEL_TRACES_EXPORTER", "none"),
            ],
            |s| assert!(!s.exports()),
        ),
        (
            &[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_COMPRESSION", "none"),
            ],
            |_| {},
        ),
        (&[("OTEL_EXPORTER_OTLP_TIMEOUT", "2500")], |s| {
            assert_eq!(s.timeout(), Duration::from_millis(2500));
        }),
        (
            &[
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
                ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "400"),
            ],
            |s| assert_eq!(s.timeout(), Duration::from_millis(400)),
        ),
        (
            &[(
                "OTEL_EXPORTER_OTLP_HEADERS",
                "x-api-key=s3cr3t,x-tenant=acme%20eu",
            )],
            |s| {
                assert_eq!(
                    s.header_names().collect::<Vec<_>>(),
                    ["x-api-key", "x-tenant"]
                );
                let debug = format!("{s:?}");
                assert!(!debug.contains("s3cr3t"), "{debug}");
                assert!(debug.contains("x-api-key"), "{debug}");
            },
        ),
        (
            &[
                ("OTEL_SERVICE_NAME", "orders-eu"),
                (
                    "OTEL_RESOURCE_ATTRIBUTES",
                    "deployment.environment.name=prod%20eu, team = a%2Cb ,,k8s.pod.name=orders-0",
                ),
            ],
            |s| {
                assert_eq!(s.service_name(), Some("orders-eu"));
                let attributes: Vec<(&str, &str)> = s
                    .resource_attributes()
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                assert_eq!(
                    attributes,
                    [
                        ("deployment.environment.name", "prod eu"),
                        ("team", "a,b"),
                        ("k8s.pod.name", "orders-0"),
                    ]
                );
            },
        ),
        (&[("OTEL_TRACES_SAMPLER", "always_on")], |s| {
            assert_eq!(s.sampler(), Sampler::AlwaysOn);
        }),
        (&[("OTEL_TRACES_SAMPLER", "always_off")], |s| {
            assert_eq!(s.sampler(), Sampler::AlwaysOff);
        }),
        (
            &[
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.1"),
            ],
            |s| assert_eq!(s.sampler(), Sampler::TraceIdRatio(0.1)),
        ),
        (&[("OTEL_TRACES_SAMPLER", "parentbased_always_on")], |s| {
            assert_eq!(s.sampler(), Sampler::ParentBasedAlwaysOn);
        }),
        (&[("OTEL_TRACES_SAMPLER", "parentbased_always_off")], |s| {
            assert_eq!(s.sampler(), Sampler::ParentBasedAlwaysOff);
        }),
        (&[("OTEL_TRACES_SAMPLER_ARG", "0")], |s| {
            assert_eq!(s.sampler(), Sampler::ParentBasedTraceIdRatio(0.0));
            assert_eq!(s.sampler().root_ratio(), 0.0);
            assert!(s.sampler().follows_parent());
        }),
        (
            &[("OTEL_TRACES_SAMPLER", ""), ("OTEL_TRACES_SAMPLER_ARG", "")],
            |s| {
                assert_eq!(
                    s.sampler(),
                    Sampler::ParentBasedTraceIdRatio(1.0),
                    "empty is unset"
                );
            },
        ),
        (
            &[
                ("OTEL_BSP_MAX_QUEUE_SIZE", "4096"),
                ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "256"),
                ("OTEL_BSP_SCHEDULE_DELAY", "200"),
            ],
            |s| {
                assert_eq!(s.max_queue_size(), 4096);
                assert_eq!(s.max_export_batch_size(), 256);
                assert_eq!(s.schedule_delay(), Duration::from_millis(200));
            },
        ),
        (&[("OTEL_BSP_MAX_QUEUE_SIZE", "100")], |s| {
            assert_eq!(
                s.max_export_batch_size(),
                100,
                "the default batch fits the queue"
            );
        }),
    ];
    for (pairs, check) in table {
        match settings(pairs) {
            Ok(s) => check(&s),
            Err(problems) => panic!("{pairs:?}: {problems:?}"),
        }
    }
}

#[test]
fn every_problem_is_listed_at_once() {
    let problems = settings(&[
        ("OTEL_SDK_DISABLED", "yes"),
        ("OTEL_TRACES_EXPORTER", "zipkin"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://collector:21"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "0"),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=hunter2,broken"),
        ("OTEL_SERVICE_NAME", "fine"),
        ("OTEL_RESOURCE_ATTRIBUTES", "ok=1,novalue,=x,bad=%zz"),
        ("OTEL_TRACES_SAMPLER", "jaeger_remote"),
        ("OTEL_TRACES_SAMPLER_ARG", "1.5"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "0"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "many"),
        ("OTEL_BSP_SCHEDULE_DELAY", "-1"),
    ])
    .unwrap_err();
    let names: Vec<&str> = problems.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "OTEL_SDK_DISABLED",
            "OTEL_TRACES_EXPORTER",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            "OTEL_EXPORTER_OTLP_TIMEOUT",
            "OTEL_EXPORTER_OTLP_COMPRESSION",
            "OTEL_EXPORTER_OTLP_HEADERS",
            "OTEL_RESOURCE_ATTRIBUTES",
            "OTEL_TRACES_SAMPLER",
            "OTEL_TRACES_SAMPLER_ARG",
            "OTEL_BSP_MAX_QUEUE_SIZE",
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
            "OTEL_BSP_SCHEDULE_DELAY",
        ]
    );
    let message = |name: &str| {
        problems
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, m)| m.as_str())
            .unwrap()
    };
    for (name, says) in [
        ("OTEL_SDK_DISABLED", "expected `true` or `false`"),
        ("OTEL_TRACES_EXPORTER", "`zipkin` is not supported"),
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "neither http:// nor https://",
        ),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "`grpc` is not supported"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "`http/protobuf` only"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "must be at least 1"),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "`gzip` is not supported"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "entry 2 has no `=`"),
        ("OTEL_RESOURCE_ATTRIBUTES", "`novalue`, `=x`, `bad=%zz`"),
        ("OTEL_TRACES_SAMPLER", "`jaeger_remote` is not supported"),
        ("OTEL_TRACES_SAMPLER_ARG", "from 0 to 1"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "must be at least 1"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "`many`"),
        ("OTEL_BSP_SCHEDULE_DELAY", "expected whole milliseconds"),
    ] {
        assert!(message(name).contains(says), "{name}: {}", message(name));
    }
    let all = format!("{problems:?}");
    assert!(!all.contains("hunter2"), "header values are secrets: {all}");
}

/// Variables, the one variable with a problem, and what its message says.
type ProblemCase<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);

#[test]
fn more_problems_each_named() {
    let cases: &[ProblemCase<'_>] = &[
        (
            &[("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json")],
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "`http/json` is not supported",
        ),
        (
            &[("OTEL_EXPORTER_OTLP_PROTOCOL", "thrift")],
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            "unknown protocol `thrift`",
        ),
        (
            &[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://")],
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "",
        ),
        (
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")],
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "",
        ),
        (
            &[
                ("OTEL_BSP_MAX_QUEUE_SIZE", "10"),
                ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "20"),
            ],
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
            "more than OTEL_BSP_MAX_QUEUE_SIZE (10)",
        ),
        (
            &[("OTEL_BSP_MAX_QUEUE_SIZE", "10000000")],
            "OTEL_BSP_MAX_QUEUE_SIZE",
            "more than 65536",
        ),
        (
            &[("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "86400000")],
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
            "more than an hour",
        ),
        (
            &[(
                "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
                "x-api-key=line%0Abreak",
            )],
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
            "the value of `x-api-key` is not a header value",
        ),
        (
            &[
                ("OTEL_TRACES_SAMPLER", "always_on"),
                ("OTEL_TRACES_SAMPLER_ARG", "half"),
            ],
            "OTEL_TRACES_SAMPLER_ARG",
            "`half`",
        ),
        (
            &[("OTEL_TRACES_EXPORTER", "otlp,console")],
            "OTEL_TRACES_EXPORTER",
            "`console`",
        ),
    ];
    for (pairs, name, says) in cases {
        let problems = settings(pairs).unwrap_err();
        assert_eq!(problems.len(), 1, "{pairs:?}: {problems:?}");
        assert_eq!(problems[0].0, *name);
        assert!(problems[0].1.contains(says), "{pairs:?}: {}", problems[0].1);
    }
}

// === export ===

#[tokio::test]
async fn spans_arrive_decoded_with_their_ids_parents_links_and_resource() {
    let _serial = SERIAL.lock().await;
    let collector = OtlpReceiver::start().await;
    let endpoint = collector.endpoint();
    let (tracing, counts) = start(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=s3cr3t%21"),
        (
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment.name=staging%20eu,service.version=9.9.9",
        ),
        ("OTEL_BSP_SCHEDULE_DELAY", "20"),
    ]);
    let tracer = tracing.provider().tracer("chassis-test");

    // A request from a caller that sampled its trace: a server span under
    // the caller's span, a client span under it, and a message published
    // with a link to another trace.
    let caller = SpanContext::new(
        TraceId::from_hex(TRACE).unwrap(),
        SpanId::from_hex(CALLER).unwrap(),
        TraceFlags::SAMPLED,
        true,
        TraceState::from_str("vendor=opaque").unwrap(),
    );
    let mut server = tracer
        .span_builder("GET /orders/v1/{id}")
        .with_kind(SpanKind::Server)
        .start_with_context(&tracer, &Context::new().with_remote_span_context(caller));
    server.set_attribute(KeyValue::new("http.route", "/orders/v1/{id}"));
    server.set_attribute(KeyValue::new("http.response.status_code", 502));
    server.set_status(Status::error("downstream failed"));
    let server_id = server.span_context().span_id();
    let server_cx = Context::new().with_span(server);
    let mut client = tracer
        .span_builder("POST")
        .with_kind(SpanKind::Client)
        .start_with_context(&tracer, &server_cx);
    client.add_event("retry", vec![KeyValue::new("attempt", 2)]);
    let client_id = client.span_context().span_id();
    client.end();
    let linked = SpanContext::new(
        TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap(),
        SpanId::from_hex("b7ad6b7169203331").unwrap(),
        TraceFlags::SAMPLED,
        false,
        TraceState::NONE,
    );
    tracer
        .span_builder("order.placed publish")
        .with_kind(SpanKind::Producer)
        .with_links(vec![Link::with_context(linked)])
        .start_with_context(&tracer, &server_cx)
        .end();
    server_cx.span().end();

    eventually("three spans at the collector", || async {
        collector.spans().len() == 3
    })
    .await;
    let spans: BTreeMap<String, _> = collector
        .spans()
        .into_iter()
        .map(|s| (s.name.clone(), s))
        .collect();
    let server = &spans["GET /orders/v1/{id}"];
    assert_eq!(server.kind, "server");
    assert_eq!(server.trace_id, TRACE);
    assert_eq!(server.span_id, format!("{server_id:016x}"));
    assert_eq!(server.parent_span_id.as_deref(), Some(CALLER));
    assert_eq!(server.trace_state, "vendor=opaque");
    assert_eq!(server.attributes["http.route"], "/orders/v1/{id}");
    assert_eq!(server.attributes["http.response.status_code"], 502);
    assert_eq!(server.status, "error");
    assert_eq!(server.status_message, "downstream failed");
    assert_eq!(server.scope, "chassis-test");
    assert!(server.start_unix_nanos > 0 && server.start_unix_nanos <= server.end_unix_nanos);

    let client = &spans["POST"];
    assert_eq!(client.kind, "client");
    assert_eq!(client.trace_id, TRACE);
    assert_eq!(client.span_id, format!("{client_id:016x}"));
    assert_eq!(client.parent_span_id, Some(server.span_id.clone()));
    assert_eq!(client.events.len(), 1);
    assert_eq!(client.events[0].name, "retry");
    assert_eq!(client.events[0].attributes["attempt"], 2);

    let producer = &spans["order.placed publish"];
    assert_eq!(producer.kind, "producer");
    assert_eq!(producer.parent_span_id, Some(server.span_id.clone()));
    assert_eq!(
        producer.links,
        [(
            "0af7651916cd43dd8448eb211c80319c".to_owned(),
            "b7ad6b7169203331".to_owned()
        )]
    );

    // The resource: the chassis' values, overridden by
    // OTEL_RESOURCE_ATTRIBUTES, and the SDK's own.
    assert_eq!(server.service_name, "orders");
    let resource = &server.resource;
    assert_eq!(resource["service.name"], "orders");
    assert_eq!(resource["service.version"], "9.9.9");
    assert_eq!(resource["service.instance.id"], "orders-7f9c");
    assert_eq!(resource["deployment.environment.name"], "staging eu");
    assert_eq!(resource["telemetry.sdk.language"], "rust");
    assert!(
        !resource.contains_key("process.pid"),
        "no detector reads the process: {resource:?}"
    );

    let headers = collector.request_headers();
    assert!(!headers.is_empty());
    assert!(headers.iter().all(|h| h["x-api-key"] == "s3cr3t!"));
    assert!(
        headers
            .iter()
            .all(|h| h["content-type"] == "application/x-protobuf")
    );

    eventually("the spans counted as exported", || async {
        counts.exported() == 3
    })
    .await;
    assert_eq!(counts.failures(), 0);
    tracing.shutdown(Duration::from_secs(10)).await;
    assert_eq!(counts.dropped("queue_full"), 0);
    assert_eq!(counts.dropped("shutdown"), 0);
}

#[tokio::test]
async fn the_service_name_comes_from_otel_service_name_then_the_attributes() {
    let _serial = SERIAL.lock().await;
    let collector = OtlpReceiver::start().await;
    let endpoint = collector.endpoint();
    for (pairs, expected) in [
        (
            vec![("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attributes")],
            "from-attributes",
        ),
        (
            vec![
                ("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attributes"),
                ("OTEL_SERVICE_NAME", "from-env"),
            ],
            "from-env",
        ),
    ] {
        let mut pairs = pairs;
        pairs.push(("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()));
        // Pipelines start one after another in the same process.
        let (tracing, _counts) = start(&pairs);
        end_spans(&tracing, "work", 1);
        tracing.shutdown(Duration::from_secs(10)).await;
        let last = collector.spans().pop().expect("a span was exported");
        assert_eq!(last.service_name, expected);
        assert_eq!(last.resource["service.version"], json!("1.4.2"));
    }
}

#[tokio::test]
async fn an_https_collector_is_reached_through_the_chassis_transport() {
    let _serial = SERIAL.lock().await;
    let (_, cert) = pki();
    let collector = OtlpReceiver::start_https(cert).await;
    let endpoint = collector.endpoint();
    assert!(endpoint.starts_with("https://localhost:"), "{endpoint}");
    let (tracing, counts) = start(&[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())]);
    end_spans(&tracing, "over tls", 2);
    tracing.shutdown(Duration::from_secs(30)).await;
    assert_eq!(collector.spans().len(), 2);
    assert_eq!(counts.exported(), 2);
    assert_eq!(counts.failures(), 0);
}

#[tokio::test]
async fn a_refusing_collector_is_counted_and_recovered_from() {
    let _serial = SERIAL.lock().await;
    let collector = OtlpReceiver::start().await;
    collector.set_failing(true);
    let endpoint = collector.endpoint();
    let (tracing, counts) = start(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "20"),
    ]);

    assert_eq!(end_spans(&tracing, "refused", 5), 5);
    eventually("the refused spans counted", || async {
        counts.dropped("export_failed") == 5
    })
    .await;
    let failures = counts.failures();
    assert!(failures >= 1);
    assert_eq!(
        collector.requests() as u64,
        2 * failures,
        "each failed export is tried twice (503 is retryable), no more"
    );
    assert_eq!(counts.exported(), 0);
    assert!(collector.spans().is_empty());

    collector.set_failing(false);
    assert_eq!(end_spans(&tracing, "accepted", 3), 3);
    eventually("the later spans exported", || async {
        counts.exported() == 3
    })
    .await;
    assert_eq!(collector.spans().len(), 3);
    assert_eq!(counts.dropped("export_failed"), 5, "nothing more lost");
    tracing.shutdown(Duration::from_secs(10)).await;
}

#[tokio::test]
async fn a_collector_that_does_not_answer_is_cut_by_the_export_timeout() {
    let _serial = SERIAL.lock().await;
    let collector = OtlpReceiver::start().await;
    collector.set_stalling(true);
    let endpoint = collector.endpoint();
    let (tracing, counts) = start(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "200"),
        ("OTEL_BSP_SCHEDULE_DELAY", "20"),
    ]);
    assert_eq!(end_spans(&tracing, "held", 1), 1);
    eventually("the held export given up", || async {
        counts.failures() == 1
    })
    .await;
    assert_eq!(counts.dropped("export_failed"), 1);
    assert_eq!(
        collector.requests(),
        1,
        "the attempt took the whole timeout: no time left to retry"
    );
    collector.set_stalling(false);
    tracing.shutdown(Duration::from_secs(10)).await;
}

#[tokio::test]
async fn a_full_queue_drops_and_counts_while_spans_keep_ending() {
    let _serial = SERIAL.lock().await;
    let endpoint = format!("http://127.0.0.1:{}", refusing_port());
    let (tracing, counts) = start(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "2"),
    ]);
    // Every export fails, after a retry a quarter of a second later: the
    // export thread takes two spans at a time, far slower than they end.
    assert_eq!(
        end_spans(&tracing, "unwanted", 100),
        100,
        "every call returned"
    );
    tracing.shutdown(Duration::from_secs(30)).await;

    let queue_full = counts.dropped("queue_full");
    assert!(queue_full > 0, "the queue of 2 overflowed");
    assert_eq!(counts.exported(), 0);
    assert!(counts.failures() >= 1);
    assert_eq!(
        queue_full + counts.dropped("export_failed") + counts.dropped("shutdown"),
        100,
        "every span is accounted for"
    );
}

#[tokio::test]
async fn shutdown_flushes_what_is_queued_then_takes_nothing() {
    let _serial = SERIAL.lock().await;
    let collector = OtlpReceiver::start().await;
    let endpoint = collector.endpoint();
    // Neither a full batch nor the schedule sends anything before shutdown.
    let (tracing, counts) = start(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "3600000"),
    ]);
    let provider = tracing.provider().clone();
    end_spans(&tracing, "queued", 10);
    assert_eq!(collector.requests(), 0, "still queued");

    tracing.shutdown(Duration::from_secs(30)).await;
    assert_eq!(collector.spans().len(), 10, "sent within the grace");
    assert_eq!(collector.requests(), 1, "in one batch");
    assert_eq!(counts.exported(), 10);

    // Spans ended afterwards are dropped, and not counted.
    let tracer = provider.tracer("chassis-test");
    let mut late = tracer.start("late");
    assert!(!late.is_recording(), "the provider is shut down");
    late.end();
    assert_eq!(collector.requests(), 1);
    assert_eq!(counts.exported(), 10);
    assert_eq!(counts.dropped("queue_full"), 0);
    assert_eq!(counts.dropped("shutdown"), 0);
}

#[tokio::test]
async fn spans_still_queued_when_the_grace_runs_out_are_counted() {
    let _serial = SERIAL.lock().await;
    let collector = OtlpReceiver::start().await;
    collector.set_stalling(true);
    let endpoint = collector.endpoint();
    let (tracing, counts) = start(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "3600000"),
        ("OTEL_BSP_SCHEDULE_DELAY", "20"),
    ]);
    end_spans(&tracing, "in flight", 5);
    eventually("an export held by the collector", || async {
        collector.requests() == 1
    })
    .await;
    end_spans(&tracing, "queued", 3);
    // The export in flight would wait an hour for its answer; shutdown
    // gives it the grace only, kept on the export thread's clock, and
    // returns all the same.
    tracing.shutdown(Duration::from_millis(300)).await;
    assert_eq!(counts.dropped("shutdown"), 8);
    assert_eq!(counts.exported(), 0);
    assert_eq!(counts.failures(), 0);
    assert!(collector.spans().is_empty());
    collector.set_stalling(false);
}
