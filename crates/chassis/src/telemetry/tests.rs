use std::sync::{Arc, Mutex};

use axum::{Router, body::Body, routing::get};
use http::Request;
use metrics_util::debugging::DebuggingRecorder;
use tower::{ServiceBuilder, ServiceExt};
use tracing_subscriber::prelude::*;

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;

use super::{
    json::{CurrentIds, RequestFields},
    observe::access_line,
    *,
};
use crate::{
    correlation::SetCorrelationIdLayer,
    log_line::{
        LogWriter, escape_into, route_is_clean, word_needs_escape, write_field, write_rfc3339,
    },
    metrics::{HttpMetrics, UNMATCHED},
    problem::EnsureProblemLayer,
};

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn lines(&self) -> Vec<serde_json::Value> {
        let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }
}

fn subscriber(capture: &Capture, filter: &str) -> impl tracing::Subscriber + Send + Sync {
    let out = capture.clone();
    tracing_subscriber::registry()
        .with(EnvFilter::new(filter))
        .with(JsonLayer::new("svc", move || out.clone()))
}

fn app(metrics: HttpMetrics) -> Router {
    Router::new()
        .route(
            "/items/{id}",
            get(|| async {
                let in_span = !tracing::Span::current().is_none();
                tracing::info!(answer = 42, in_span, "inside the handler");
                "ok"
            }),
        )
        .route("/health/live", get(|| async { "up" }))
        .route(
            "/stream",
            get(|| async {
                let chunks = vec![
                    Ok::<_, std::io::Error>(Bytes::from("a")),
                    Ok(Bytes::from("b")),
                ];
                Body::from_stream(futures_util_like(chunks))
            }),
        )
        .layer(
            ServiceBuilder::new()
                .layer(SetCorrelationIdLayer::new())
                .layer(EnsureProblemLayer::new())
                .layer(ObserveLayer::new(metrics)),
        )
}

/// A stream over a vector.
fn futures_util_like<T: Send + 'static>(
    items: Vec<T>,
) -> impl futures_core::Stream<Item = T> + Send {
    struct Iter<T>(std::vec::IntoIter<T>);
    impl<T> Unpin for Iter<T> {}
    impl<T> futures_core::Stream for Iter<T> {
        type Item = T;
        fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<T>> {
            Poll::Ready(self.0.next())
        }
    }
    Iter(items.into_iter())
}

async fn send(app: Router, req: Request<Body>) -> http::StatusCode {
    let res = app.oneshot(req).await.unwrap();
    let status = res.status();
    let _ = crate::problem::body_bytes(res.into_body()).await;
    status
}

/// The subscriber [`init`] installs for JSON: no request span.
fn subscriber_as_init(capture: &Capture, filter: &str) -> impl tracing::Subscriber + Send + Sync {
    let out = capture.clone();
    tracing_subscriber::registry()
        .with(EnvFilter::new(filter))
        .with(WithoutRequestSpans)
        .with(JsonLayer::new("svc", move || out.clone()))
}

#[tokio::test(flavor = "current_thread")]
async fn one_access_log_line_per_request_with_correlation() {
    let capture = Capture::default();
    let _sub = tracing::subscriber::set_default(subscriber(&capture, "info"));
    access_and_handler_lines(&capture, true).await;
}

#[tokio::test(flavor = "current_thread")]
async fn without_the_request_span_lines_still_carry_the_ids() {
    let capture = Capture::default();
    let _sub = tracing::subscriber::set_default(subscriber_as_init(&capture, "info"));
    access_and_handler_lines(&capture, false).await;
    // A request polled inside another's poll carries its own ids, and the
    // outer ones come back after it.
    let outer = RequestFields::EMPTY;
    let mut inner = outer;
    inner.correlation_id.set("inner");
    {
        let _outer = CurrentIds::enter(outer);
        {
            let _inner = CurrentIds::enter(inner);
            tracing::info!("nested");
        }
        tracing::info!("outer");
    }
    tracing::info!("outside");
    // Background work carrying a request's ids keeps its span.
    let work = tracing::info_span!(target: REQUEST_TARGET, "mail.deliver", correlation_id = "bg-1", trace_id = "t");
    work.in_scope(|| tracing::info!("in the background"));
    let lines = capture.lines();
    assert_eq!(lines[lines.len() - 1]["correlation_id"], "bg-1");
    let lines = &lines[..lines.len() - 1];
    let [nested, outer, outside] = &lines[lines.len() - 3..] else {
        unreachable!()
    };
    assert_eq!(nested["correlation_id"], "inner");
    assert_eq!(outer["correlation_id"], "");
    assert!(outside.get("correlation_id").is_none(), "{outside}");
}

async fn access_and_handler_lines(capture: &Capture, with_span: bool) {
    let recorder = DebuggingRecorder::new();
    let _rec = metrics::set_default_local_recorder(&recorder);
    let app = app(HttpMetrics::new("svc"));

    let req = Request::get("/items/7?token=abc")
        .header("x-correlation-id", "corr-1")
        .header("authorization", "Bearer very-secret-token")
        .header("cookie", "session=very-secret-cookie")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(app.clone(), req).await, 200);
    let lines = capture.lines();
    assert_eq!(lines.len(), 2, "{lines:?}");
    let handler = &lines[0];
    assert_eq!(handler["message"], "inside the handler");
    assert_eq!(handler["answer"], 42);
    assert_eq!(handler["in_span"], with_span);
    assert_eq!(handler["correlation_id"], "corr-1");
    assert_eq!(handler["trace_id"].as_str().unwrap().len(), 32);
    assert_eq!(handler["service"], "svc");
    assert_eq!(handler["level"], "INFO");
    let access = &lines[1];
    assert_eq!(access["target"], ACCESS_TARGET);
    assert_eq!(access["message"], "request");
    assert_eq!(access["method"], "GET");
    assert_eq!(access["route"], "/items/{id}");
    assert_eq!(access["status"], 200);
    assert!(access["latency_us"].is_u64());
    assert_eq!(access["correlation_id"], "corr-1");
    assert_eq!(access["trace_id"], handler["trace_id"]);
    let time = access["time"].as_str().unwrap();
    assert_eq!(time.len(), "2026-11-21T22:36:19.123456Z".len(), "{time}");
    assert!(time.ends_with('Z'));

    let text = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    for secret in [
        "very-secret-token",
        "very-secret-cookie",
        "token=abc",
        "/items/7",
    ] {
        assert!(!text.contains(secret), "{secret} leaked into logs: {text}");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn unmatched_paths_and_streams_are_logged_once() {
    let capture = Capture::default();
    let _sub = tracing::subscriber::set_default(subscriber(&capture, "info"));
    let recorder = DebuggingRecorder::new();
    let _rec = metrics::set_default_local_recorder(&recorder);
    let app = app(HttpMetrics::new("svc"));

    assert_eq!(
        send(
            app.clone(),
            Request::get("/wp-admin/../etc")
                .body(Body::empty())
                .unwrap()
        )
        .await,
        404
    );
    assert_eq!(
        send(
            app.clone(),
            Request::get("/stream").body(Body::empty()).unwrap()
        )
        .await,
        200
    );
    // Probes are debug, so filtered out at info.
    assert_eq!(
        send(
            app,
            Request::get("/health/live").body(Body::empty()).unwrap()
        )
        .await,
        200
    );
    let lines = capture.lines();
    let access: Vec<_> = lines
        .iter()
        .filter(|l| l["target"] == ACCESS_TARGET)
        .collect();
    assert_eq!(access.len(), 2, "{lines:?}");
    assert_eq!(access[0]["route"], UNMATCHED);
    assert_eq!(access[0]["status"], 404);
    assert_eq!(access[1]["route"], "/stream");
}

#[tokio::test(flavor = "current_thread")]
async fn dropped_requests_are_logged_as_499() {
    let capture = Capture::default();
    let _sub = tracing::subscriber::set_default(subscriber(&capture, "info"));
    let recorder = DebuggingRecorder::new();
    let _rec = metrics::set_default_local_recorder(&recorder);
    let app = Router::new()
        .route("/hang", get(std::future::pending::<&'static str>))
        .layer(ObserveLayer::new(HttpMetrics::new("svc")));
    let mut fut = Box::pin(app.oneshot(Request::get("/hang").body(Body::empty()).unwrap()));
    assert!(futures_poll_once(fut.as_mut()).await.is_none());
    drop(fut);
    let lines = capture.lines();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["status"], 499);
}

async fn futures_poll_once<F: Future + Unpin>(mut f: F) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        Poll::Ready(match Pin::new(&mut f).poll(cx) {
            Poll::Ready(v) => Some(v),
            Poll::Pending => None,
        })
    })
    .await
}

// R4: ids and values from queues or bodies cannot forge log lines.
#[test]
fn values_are_escaped_into_one_line() {
    let capture = Capture::default();
    tracing::subscriber::with_default(subscriber(&capture, "trace"), || {
        let span = tracing::info_span!(target: REQUEST_TARGET, "request", correlation_id = "a\nb\"c", trace_id = "t");
        let _e = span.enter();
        tracing::warn!(
            body = "line1\n{\"level\":\"ERROR\"}\r\t\u{0}\u{7f}",
            debug = ?"quoted \"x\"",
            service = "forged",
            ratio = f64::NAN,
            ok = true,
            n = -3i64,
            "message with \"quotes\"\nand newline"
        );
    });
    let text = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    let line: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
    assert_eq!(line["body"], "line1\n{\"level\":\"ERROR\"}\r\t\u{0}\u{7f}");
    assert_eq!(line["correlation_id"], "a\nb\"c");
    assert_eq!(line["service"], "svc");
    assert_eq!(line["field.service"], "forged");
    assert_eq!(line["ratio"], "NaN");
    assert_eq!(line["ok"], true);
    assert_eq!(line["n"], -3);
    assert_eq!(line["level"], "WARN");
    assert_eq!(line["debug"], "\"quoted \\\"x\\\"\"");
    assert_eq!(line["message"], "message with \"quotes\"\nand newline");
}

#[test]
fn rfc3339_dates() {
    let cases = [
        (0u64, "1970-01-01T00:00:00.000000Z"),
        (951_782_400, "2000-02-29T00:00:00.000000Z"),
        (1_795_299_379, "2026-11-21T22:16:19.000000Z"),
        (4_107_542_399, "2100-02-28T23:59:59.000000Z"),
    ];
    for (secs, want) in cases {
        let mut buf = Vec::new();
        write_rfc3339(
            &mut buf,
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs),
        );
        assert_eq!(String::from_utf8(buf).unwrap(), want);
    }
}

#[test]
fn ids_logged_outside_a_request_keep_their_names() {
    // The audit thread logs ids as plain fields: they must not be renamed.
    let capture = Capture::default();
    tracing::subscriber::with_default(subscriber(&capture, "info"), || {
        tracing::info!(target: "audit", correlation_id = "from-the-queue", trace_id = "t1", "audit");
    });
    let lines = capture.lines();
    assert_eq!(lines[0]["correlation_id"], "from-the-queue");
    assert_eq!(lines[0]["trace_id"], "t1");
    assert!(lines[0].get("field.correlation_id").is_none());
}

/// The byte-at-a-time escape the fast one must equal.
fn reference_escape(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for &b in s.as_bytes() {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0..=0x1f | 0x7f => out.extend_from_slice(format!("\\u{b:04x}").as_bytes()),
            _ => out.push(b),
        }
    }
    out
}

proptest::proptest! {
    #[test]
    fn the_word_test_is_exact(bytes in proptest::prelude::any::<[u8; 8]>()) {
        let expected = bytes.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\' || b == 0x7f);
        proptest::prop_assert_eq!(word_needs_escape(u64::from_le_bytes(bytes)), expected);
    }

    #[test]
    fn escaping_matches_the_reference_and_round_trips(s in "(?s).{0,80}") {
        let mut fast = Vec::new();
        escape_into(&mut fast, &s);
        proptest::prop_assert_eq!(&fast, &reference_escape(&s));
        let quoted = format!("\"{}\"", String::from_utf8(fast).unwrap());
        let back: String = serde_json::from_str(&quoted).unwrap();
        proptest::prop_assert_eq!(back, s);
    }
}

#[test]
fn escaping_handles_every_position_in_a_word() {
    for special in ["\"", "\\", "\n", "\u{1}", "\u{7f}"] {
        for at in 0..17 {
            for s in [
                "a".repeat(at) + special + &"é".repeat(3),
                // Last: found by the overlapping check of the tail word.
                "a".repeat(at) + special,
            ] {
                let mut fast = Vec::new();
                escape_into(&mut fast, &s);
                assert_eq!(fast, reference_escape(&s), "{s:?}");
            }
        }
    }
    // Clean strings of every length around the word size are copied as is.
    for n in 0..25 {
        let s = "x".repeat(n);
        let mut fast = Vec::new();
        escape_into(&mut fast, &s);
        assert_eq!(fast, s.as_bytes());
    }
}

#[test]
fn numbers_and_field_names_are_written_as_json() {
    let capture = Capture::default();
    tracing::subscriber::with_default(subscriber(&capture, "info"), || {
        tracing::info!(
            zero = 0u64,
            max = u64::MAX,
            negative = -42i64,
            min = i64::MIN,
            dotted.name = 1u64,
            "numbers"
        );
    });
    let lines = capture.lines();
    let l = &lines[0];
    assert_eq!(l["zero"], 0);
    assert_eq!(l["max"], u64::MAX);
    assert_eq!(l["negative"], -42);
    assert_eq!(l["min"], i64::MIN);
    assert_eq!(l["dotted.name"], 1);
    assert_eq!(l["message"], "numbers");
}

#[test]
fn the_direct_access_line_is_the_one_the_tracing_event_renders() {
    use crate::correlation::{CorrelationId, TraceContext};

    let id = CorrelationId::parse("c-1").unwrap();
    let root = TraceContext::new_root();
    let (trace, span_id) = (root.trace_id(), root.span_id());

    // Through tracing: the request span carries the ids, the event the rest.
    let capture = Capture::default();
    tracing::subscriber::with_default(subscriber(&capture, "info"), || {
        let span = tracing::info_span!(target: REQUEST_TARGET, "request", method = "GET", route = "/svc/v1/{id}", correlation_id = id.as_str(), trace_id = trace.as_str(), span_id = span_id.as_str());
        tracing::info!(target: ACCESS_TARGET, parent: &span, method = "GET", route = "/svc/v1/{id}", status = 200u16, latency_us = 77u64, "request");
    });
    let mut via_tracing = capture.lines().remove(0);

    // Directly.
    let direct_out = Capture::default();
    let (writer, guard) = LogWriter::spawn(direct_out.clone(), |_| Vec::new());
    let lines = JsonLines::new("svc", writer);
    let mut ids = RequestFields::EMPTY;
    ids.correlation_id.set(id.as_str());
    ids.trace_id.set(trace.as_str());
    ids.span_id.set(span_id.as_str());
    access_line(&lines, &ids, "GET", ("/svc/v1/{id}", false), 200, 77);
    drop(lines);
    drop(guard);
    let mut direct = direct_out.lines().remove(0);

    for line in [&mut via_tracing, &mut direct] {
        let time = line.as_object_mut().unwrap().remove("time").unwrap();
        assert!(time.as_str().unwrap().ends_with('Z'), "{time}");
    }
    assert_eq!(direct, via_tracing);
    assert_eq!(direct["correlation_id"], "c-1");
    assert_eq!(direct["latency_us"], 77);
}

#[tokio::test]
async fn routes_are_remembered_clean_only_when_they_are() {
    let seen = crate::metrics::matched_paths(&[
        ("/plain/{x}", "/plain/1"),
        ("/q\"uote\\d", "/q\"uote\\d"),
    ])
    .await;
    let (plain, quoted) = (&seen[0], &seen[1]);
    for _ in 0..3 {
        assert!(route_is_clean(plain));
        assert!(!route_is_clean(quoted), "{}", quoted.as_str());
    }
    // A line stays valid JSON with the one that needs escaping.
    let mut buf = Vec::new();
    write_field(
        &mut buf,
        "{\"route\":\"",
        quoted.as_str(),
        !route_is_clean(quoted),
    );
    buf.push(b'}');
    let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
    assert_eq!(v["route"], "/q\"uote\\d");
}
