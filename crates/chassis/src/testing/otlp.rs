//! An OTLP/HTTP collector on loopback, for tests of what a service exports.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use axum::{
    Router,
    extract::{DefaultBodyLimit, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use bytes::Bytes;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse},
    common::v1::{AnyValue, KeyValue, any_value},
};
use prost::Message;
use serde_json::Value;
use tokio::sync::{oneshot, watch};

/// The content type of OTLP/HTTP with protobuf.
const PROTOBUF: &str = "application/x-protobuf";

/// An OTLP/HTTP collector on `127.0.0.1`: it takes `POST /v1/traces` with
/// protobuf bodies, as a real collector does, decodes them with the
/// OpenTelemetry protocol's own types, and keeps the spans for a test to
/// look at.
///
/// Point a service at it with `OTEL_EXPORTER_OTLP_ENDPOINT` set to
/// [`endpoint`](Self::endpoint). [`set_failing`](Self::set_failing) makes
/// it answer 503 (a collector that is overloaded or restarting), and
/// [`set_stalling`](Self::set_stalling) makes it hold every request
/// without answering (a collector that hangs), to test what the exporter
/// does then. It stops when dropped. [`start_https`](Self::start_https)
/// serves it over TLS with a certificate of a [`TestPki`](super::TestPki).
///
/// ```
/// use std::time::Duration;
/// use chassis::config::{Env, Reader};
/// use chassis::otel::{ResourceInfo, TraceSettings, Tracing};
/// use chassis::testing::{OtlpReceiver, eventually};
/// use opentelemetry::trace::{Span as _, SpanKind, Tracer as _, TracerProvider as _};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let collector = OtlpReceiver::start().await;
/// let env = Env::from_pairs([("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint())]);
/// let settings = TraceSettings::read(&mut Reader::new(&env));
/// let resource = ResourceInfo {
///     service_name: "orders".to_owned(),
///     service_version: "1.0.0".to_owned(),
///     instance_id: "orders-1".to_owned(),
/// };
/// let tracing = Tracing::start(&settings, resource).unwrap();
///
/// let tracer = tracing.provider().tracer("orders");
/// let mut span = tracer.span_builder("GET /orders/v1/{id}").with_kind(SpanKind::Server).start(&tracer);
/// span.set_attribute(opentelemetry::KeyValue::new("http.response.status_code", 200));
/// span.end();
/// tracing.shutdown(Duration::from_secs(10)).await;
///
/// let spans = collector.spans();
/// assert_eq!(spans.len(), 1);
/// assert_eq!(spans[0].name, "GET /orders/v1/{id}");
/// assert_eq!(spans[0].kind, "server");
/// assert_eq!(spans[0].service_name, "orders");
/// assert_eq!(spans[0].attributes["http.response.status_code"], 200);
/// assert_eq!(spans[0].resource["service.version"], "1.0.0");
/// assert_eq!(collector.requests(), 1);
/// # }
/// ```
pub struct OtlpReceiver {
    addr: SocketAddr,
    scheme: &'static str,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
}

/// A span as the collector received it, ids in lowercase hex.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ReceivedSpan {
    /// The trace id, 32 hex digits.
    pub trace_id: String,
    /// The span id, 16 hex digits.
    pub span_id: String,
    /// The parent's span id, `None` for a root span.
    pub parent_span_id: Option<String>,
    /// The W3C `tracestate` the span carries (empty when none).
    pub trace_state: String,
    /// The span's name.
    pub name: String,
    /// `server`, `client`, `internal`, `producer`, `consumer`, or
    /// `unspecified`.
    pub kind: &'static str,
    /// The span's attributes: strings, booleans and numbers as JSON values,
    /// arrays and key-value lists as arrays and objects, bytes as hex.
    pub attributes: BTreeMap<String, Value>,
    /// The span's events, in order.
    pub events: Vec<ReceivedEvent>,
    /// The span's links, as (trace id, span id).
    pub links: Vec<(String, String)>,
    /// When it started, in nanoseconds since the Unix epoch.
    pub start_unix_nanos: u64,
    /// When it ended, in nanoseconds since the Unix epoch.
    pub end_unix_nanos: u64,
    /// `unset`, `ok` or `error`.
    pub status: &'static str,
    /// The status's description (errors only).
    pub status_message: String,
    /// The name of the instrumentation scope (the tracer) that made it.
    pub scope: String,
    /// The resource's `service.name` (empty when it has none).
    pub service_name: String,
    /// The resource's attributes.
    pub resource: BTreeMap<String, Value>,
}

/// An event of a [`ReceivedSpan`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ReceivedEvent {
    /// Its name (`exception` for a recorded error).
    pub name: String,
    /// Its attributes, as the span's.
    pub attributes: BTreeMap<String, Value>,
}

#[derive(Default)]
struct Shared {
    spans: Mutex<Vec<ReceivedSpan>>,
    headers: Mutex<Vec<HeaderMap>>,
    requests: AtomicUsize,
    failing: AtomicBool,
    stalling: watch::Sender<bool>,
}

// === impl OtlpReceiver ===

impl fmt::Debug for OtlpReceiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OtlpReceiver")
            .field("addr", &self.addr)
            .field("requests", &self.requests())
            .finish_non_exhaustive()
    }
}

impl OtlpReceiver {
    /// Starts it on a free port of `127.0.0.1`, on the current runtime.
    ///
    /// # Panics
    ///
    /// If no loopback port can be bound (a test helper: the panic is the
    /// test's failure).
    pub async fn start() -> Self {
        let shared = Arc::new(Shared::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let addr = listener.local_addr().expect("a bound listener");
        let (stop, stopped) = oneshot::channel::<()>();
        let app = router(shared.clone());
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
        });
        Self {
            addr,
            scheme: "http",
            shared,
            stop: Some(stop),
        }
    }

    /// Starts it over HTTPS (HTTP/2 or HTTP/1.1 by ALPN) on a free port of
    /// `127.0.0.1`, presenting `cert`, until the runtime ends: an exporter
    /// that trusts the certificate's [`TestPki`](super::TestPki) reaches it
    /// at [`endpoint`](Self::endpoint), `https://localhost:<port>`.
    ///
    /// # Panics
    ///
    /// If no loopback port can be bound.
    pub async fn start_https(cert: &super::TestCert) -> Self {
        let shared = Arc::new(Shared::default());
        let addr = cert.serve(router(shared.clone()), true).await;
        Self {
            addr,
            scheme: "https",
            shared,
            stop: None,
        }
    }

    /// The base URL, for `OTEL_EXPORTER_OTLP_ENDPOINT`:
    /// `http://127.0.0.1:<port>`, or `https://localhost:<port>` (spans are
    /// posted to `/v1/traces` below it).
    pub fn endpoint(&self) -> String {
        match self.scheme {
            "https" => format!("https://localhost:{}", self.addr.port()),
            _ => format!("http://{}", self.addr),
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every span received so far, in the order received.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        lock(&self.shared.spans).clone()
    }

    /// How many export requests (`POST /v1/traces`) it has seen, answered
    /// or refused.
    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// The headers of every export request so far, in order.
    pub fn request_headers(&self) -> Vec<HeaderMap> {
        lock(&self.shared.headers).clone()
    }

    /// While `true`, every export request is answered 503 Service
    /// Unavailable, and its spans are not kept.
    pub fn set_failing(&self, failing: bool) {
        self.shared.failing.store(failing, Ordering::SeqCst);
    }

    /// While `true`, every export request is held without an answer; set
    /// it back to `false` and the held ones are answered.
    pub fn set_stalling(&self, stalling: bool) {
        self.shared.stalling.send_replace(stalling);
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.shared.stalling.send_replace(false);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/traces", post(export))
        .layer(DefaultBodyLimit::max(64 * 1024 * 1024))
        .with_state(shared)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn export(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    shared.requests.fetch_add(1, Ordering::SeqCst);
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    lock(&shared.headers).push(headers);
    let mut stalling = shared.stalling.subscribe();
    let _ = stalling.wait_for(|stalled| !*stalled).await;
    if shared.failing.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "refusing, as asked").into_response();
    }
    if content_type != PROTOBUF {
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "expected application/x-protobuf",
        )
            .into_response();
    }
    let request = match ExportTraceServiceRequest::decode(body) {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    let received = spans_of(request);
    lock(&shared.spans).extend(received);
    (
        [(header::CONTENT_TYPE, PROTOBUF)],
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
        .into_response()
}

fn spans_of(request: ExportTraceServiceRequest) -> Vec<ReceivedSpan> {
    let mut out = Vec::new();
    for rs in request.resource_spans {
        let resource = rs
            .resource
            .map(|r| attributes(r.attributes))
            .unwrap_or_default();
        let service_name = resource
            .get("service.name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        for ss in rs.scope_spans {
            let scope = ss.scope.map(|s| s.name).unwrap_or_default();
            for s in ss.spans {
                let status = s.status.unwrap_or_default();
                out.push(ReceivedSpan {
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: (!s.parent_span_id.is_empty()).then(|| hex(&s.parent_span_id)),
                    trace_state: s.trace_state,
                    name: s.name,
                    kind: match s.kind {
                        1 => "internal",
                        2 => "server",
                        3 => "client",
                        4 => "producer",
                        5 => "consumer",
                        _ => "unspecified",
                    },
                    attributes: attributes(s.attributes),
                    events: s
                        .events
                        .into_iter()
                        .map(|e| ReceivedEvent {
                            name: e.name,
                            attributes: attributes(e.attributes),
                        })
                        .collect(),
                    links: s
                        .links
                        .into_iter()
                        .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                        .collect(),
                    start_unix_nanos: s.start_time_unix_nano,
                    end_unix_nanos: s.end_time_unix_nano,
                    status: match status.code {
                        1 => "ok",
                        2 => "error",
                        _ => "unset",
                    },
                    status_message: status.message,
                    scope: scope.clone(),
                    service_name: service_name.clone(),
                    resource: resource.clone(),
                });
            }
        }
    }
    out
}

fn attributes(kvs: Vec<KeyValue>) -> BTreeMap<String, Value> {
    kvs.into_iter()
        .map(|kv| (kv.key, kv.value.map_or(Value::Null, value)))
        .collect()
}

fn value(v: AnyValue) -> Value {
    match v.value {
        Some(any_value::Value::StringValue(s)) => Value::String(s),
        Some(any_value::Value::BoolValue(b)) => Value::Bool(b),
        Some(any_value::Value::IntValue(i)) => Value::from(i),
        Some(any_value::Value::DoubleValue(d)) => Value::from(d),
        Some(any_value::Value::ArrayValue(a)) => {
            Value::Array(a.values.into_iter().map(value).collect())
        }
        Some(any_value::Value::KvlistValue(l)) => {
            Value::Object(attributes(l.values).into_iter().collect())
        }
        Some(any_value::Value::BytesValue(b)) => Value::String(hex(&b)),
        Some(any_value::Value::StringValueStrindex(_)) | None => Value::Null,
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}
