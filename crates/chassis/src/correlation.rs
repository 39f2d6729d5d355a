//! Correlation IDs and W3C trace context.
//!
//! # The standard
//!
//! Every request carries a correlation id from the edge of the system to the
//! last service it touches, so that one search finds every log line, audit
//! record, metric exemplar and outbox row of one user action. Every service
//! therefore:
//!
//! * accepts the caller's `x-correlation-id` when it is 1-128 characters of
//!   `[A-Za-z0-9._~:-]` and exactly one header carries it;
//! * otherwise replaces it with a fresh UUIDv7 (time-ordered, so ids sort
//!   roughly by time), and never echoes or logs the rejected value as it came
//!   (that is how header and log injection happen: a rejected value is logged
//!   only as a short, escaped sample, at debug level);
//! * returns the id on every response, puts it in the request's tracing span
//!   (so every log line of the request carries it) and in every error body;
//! * forwards it on every outgoing call.
//!
//! Trace context follows W3C Trace Context Level 1: a valid `traceparent`
//! (`00-<32 hex>-<16 hex>-<2 hex>`, lowercase, ids not all zero, version not
//! `ff`; later versions are read by their first four fields) is continued, so
//! its trace id appears in our logs and on our outgoing calls; an invalid one
//! is ignored together with its `tracestate`, and a new trace is started.
//! Neither header is ever a reason to reject a request. A request that
//! brings neither gets one UUIDv7 for both: the new trace's id is the
//! correlation id's 128 bits (the last 7 bytes random, as Trace Context
//! Level 2 asks of a random trace id), so a search by either finds the other.
//!
//! Client-supplied ids are hints for correlation, never identities: do not use
//! them as idempotency keys, cache keys or authorization inputs, and never as
//! metric labels.
//!
//! # How the chassis does it
//!
//! [`SetCorrelationIdLayer`] validates or generates the [`CorrelationId`],
//! parses the [`TraceContext`], puts both into the request extensions as one
//! [`Correlation`] (handlers extract either) and sets `x-correlation-id` on
//! the response. Code inside reads the id from there, never from the raw
//! request header, which may hold the rejected value. An
//! outgoing client forwards [`CorrelationId::header_value`] and
//! [`TraceContext::child_traceparent`] (plus [`TraceContext::tracestate`]).
//!
//! # Example
//!
//! ```
//! use axum::{Router, body::Body, routing::get};
//! use chassis::correlation::{CorrelationId, SetCorrelationIdLayer, TraceContext};
//! use http::Request;
//! use tower::ServiceExt;
//!
//! async fn handler(id: CorrelationId, trace: TraceContext) -> String {
//!     format!("{id} {}", trace.trace_id())
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let app = Router::new().route("/", get(handler)).layer(SetCorrelationIdLayer::new());
//! let req = Request::get("/")
//!     .header("x-correlation-id", "order-42")
//!     .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
//!     .body(Body::empty())
//!     .unwrap();
//! let res = app.clone().oneshot(req).await.unwrap();
//! assert_eq!(res.headers()["x-correlation-id"], "order-42");
//! let body = chassis::problem::body_bytes(res.into_body()).await;
//! assert_eq!(body, "order-42 4bf92f3577b34da6a3ce929d0e0e4736");
//!
//! // A value that could inject a header or a log line is replaced.
//! let req = Request::get("/").header("x-correlation-id", "a b").body(Body::empty()).unwrap();
//! let res = app.oneshot(req).await.unwrap();
//! assert_ne!(res.headers()["x-correlation-id"], "a b");
//! # }
//! ```
//!
//! # Ordering
//!
//! Outermost: everything inside (problem bodies, the request span, metrics,
//! audit) reads the id from the request extensions.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
};

use axum::response::Response;
use http::Request;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::context::RequestContext;
pub use crate::context::{
    CorrelationId, HexId, MAX_LEN, RequestContext as Correlation, TRACEPARENT, TRACESTATE,
    TraceContext, X_CORRELATION_ID,
};

/// Layer that validates or generates the [`CorrelationId`], parses the
/// [`TraceContext`] and returns the id on the response; see the
/// [module docs](self).
#[derive(Debug, Clone, Copy, Default)]
pub struct SetCorrelationIdLayer {
    _priv: (),
}

impl SetCorrelationIdLayer {
    /// Creates the layer.
    pub const fn new() -> Self {
        Self { _priv: () }
    }
}

impl<S> Layer<S> for SetCorrelationIdLayer {
    type Service = SetCorrelationId<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SetCorrelationId { inner }
    }
}

/// Service built by [`SetCorrelationIdLayer`].
#[derive(Debug, Clone)]
pub struct SetCorrelationId<S> {
    inner: S,
}

impl<S> SetCorrelationId<S> {
    define_inner_service_accessors!();

    /// Wraps `inner`.
    pub const fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S, B> Service<Request<B>> for SetCorrelationId<S>
where
    S: Service<Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let id = assign(&mut req);
        ResponseFuture::new(self.inner.call(req), id)
    }
}

/// The correlation step: makes the request's [`RequestContext`] from its
/// headers (inner steps and handlers read the validated id from there, never
/// from the raw header) and returns the id, for the response.
pub(crate) fn assign<B>(req: &mut Request<B>) -> CorrelationId {
    let ctx = RequestContext::from_headers(req.headers());
    let id = ctx.id().clone();
    req.extensions_mut().insert(ctx);
    id
}

pin_project! {
    /// Response future of [`SetCorrelationId`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        id: Option<CorrelationId>,
    }
}

impl<F> ResponseFuture<F> {
    /// Puts `id` on the response of `inner`.
    pub(crate) fn new(inner: F, id: CorrelationId) -> Self {
        Self {
            inner,
            id: Some(id),
        }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut res = ready!(this.inner.poll(cx))?;
        if let Some(id) = this.id.take() {
            res.headers_mut()
                .insert(X_CORRELATION_ID, id.into_header_value());
        }
        Poll::Ready(Ok(res))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::ids::{REJECTED_SAMPLE_LEN, SCAN_MAX_HEADERS, parse_traceparent, sample};
    use axum::{Router, body::Body, routing::get};
    use http::{HeaderMap, HeaderValue};
    use tower::ServiceExt;

    fn app() -> Router {
        Router::new()
            .route(
                "/",
                get(|id: CorrelationId, t: TraceContext| async move {
                    format!(
                        "{id}|{}|{}",
                        t.trace_id(),
                        t.tracestate()
                            .map(|v| v.to_str().unwrap().to_owned())
                            .unwrap_or_default()
                    )
                }),
            )
            .layer(SetCorrelationIdLayer::new())
    }

    async fn call(req: Request<Body>) -> (HeaderValue, Vec<String>) {
        let res = app().oneshot(req).await.unwrap();
        let header = res.headers()[X_CORRELATION_ID].clone();
        assert_eq!(res.headers().get_all(X_CORRELATION_ID).iter().count(), 1);
        let body = crate::problem::body_bytes(res.into_body()).await;
        let parts = String::from_utf8(body.to_vec())
            .unwrap()
            .split('|')
            .map(str::to_owned)
            .collect();
        (header, parts)
    }

    fn with_id(value: &[u8]) -> Request<Body> {
        Request::get("/")
            .header(X_CORRELATION_ID, HeaderValue::from_bytes(value).unwrap())
            .body(Body::empty())
            .unwrap()
    }

    fn is_uuid_v7(v: &HeaderValue) -> bool {
        uuid::Uuid::parse_str(v.to_str().unwrap()).is_ok_and(|u| u.get_version_num() == 7)
    }

    // R1
    #[tokio::test]
    async fn missing_id_is_generated_as_uuid_v7() {
        let (header, body) = call(Request::get("/").body(Body::empty()).unwrap()).await;
        assert!(is_uuid_v7(&header), "{header:?}");
        assert_eq!(body[0], header.to_str().unwrap());
        // With no traceparent either, the new trace's id is the same UUID.
        assert_eq!(body[1], body[0].replace('-', ""));
    }

    #[tokio::test]
    async fn a_new_trace_has_its_own_id_when_the_caller_named_the_correlation() {
        let (a, b) = (
            call(with_id(b"order-1")).await.1,
            call(with_id(b"order-1")).await.1,
        );
        assert_eq!((a[0].as_str(), b[0].as_str()), ("order-1", "order-1"));
        assert_eq!(a[1].len(), 32);
        assert!(
            a[1].bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(a[1], b[1], "each request starts its own trace");
    }

    #[tokio::test]
    async fn a_continued_trace_keeps_the_callers_id_beside_a_generated_correlation_id() {
        let (header, body) = call(with_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            None,
        ))
        .await;
        assert!(is_uuid_v7(&header), "{header:?}");
        assert_eq!(body[1], "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[tokio::test]
    async fn ids_are_found_among_many_headers_as_among_few() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        for others in [0, 5, SCAN_MAX_HEADERS, SCAN_MAX_HEADERS + 10] {
            let with_others = |mut b: http::request::Builder| {
                for i in 0..others {
                    b = b.header(format!("x-other-{i}"), "v");
                }
                b
            };
            let req = with_others(Request::get("/"))
                .header(X_CORRELATION_ID, "kept-1")
                .header(TRACEPARENT, tp)
                .body(Body::empty())
                .unwrap();
            let (header, body) = call(req).await;
            assert_eq!(header, "kept-1", "{others} other headers");
            assert_eq!(body[1], "4bf92f3577b34da6a3ce929d0e0e4736");
            // Twice: replaced, and the trace is a new one.
            let req = with_others(Request::get("/"))
                .header(X_CORRELATION_ID, "kept-1")
                .header(X_CORRELATION_ID, "kept-2")
                .header(TRACEPARENT, tp)
                .header(TRACEPARENT, tp)
                .body(Body::empty())
                .unwrap();
            let (header, body) = call(req).await;
            assert!(is_uuid_v7(&header), "{others} other headers: {header:?}");
            assert_ne!(body[1], "4bf92f3577b34da6a3ce929d0e0e4736");
        }
    }

    #[test]
    fn hex_ids_are_lowercase_digits_of_every_byte() {
        let bytes: Vec<u8> = (0..=255).collect();
        for chunk in bytes.chunks(16) {
            let expected: String = chunk.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(HexId::<32>::new(chunk).as_str(), expected);
        }
    }

    // R2
    #[tokio::test]
    async fn valid_id_is_kept() {
        for id in ["abc-123", "a", "A.b_c~d:e-f", &"x".repeat(128)] {
            let (header, body) = call(with_id(id.as_bytes())).await;
            assert_eq!(header, id);
            assert_eq!(body[0], id);
        }
    }

    // R3, R5
    #[tokio::test]
    async fn invalid_ids_are_replaced() {
        let long = "x".repeat(129);
        let huge = "y".repeat(64 * 1024);
        let cases: Vec<&[u8]> = vec![
            b"abc Set-Cookie: x",
            b"abc\tdef",
            long.as_bytes(),
            huge.as_bytes(),
            b"caf\xc3\xa9",
            b"\xff\xfe",
            b"a,b",
            b"a/b",
            b"<script>",
            b"%0d%0a",
        ];
        for value in cases {
            let (header, body) = call(with_id(value)).await;
            assert!(is_uuid_v7(&header), "{value:?} gave {header:?}");
            assert_eq!(body[0], header.to_str().unwrap());
        }
    }

    #[test]
    fn header_values_with_line_breaks_cannot_be_built() {
        // The http crate refuses CR/LF/NUL, so no layer can be handed one.
        assert!(HeaderValue::from_bytes(b"abc\r\nSet-Cookie: x").is_err());
        assert!(HeaderValue::from_bytes(b"abc\0").is_err());
    }

    // R6
    #[tokio::test]
    async fn two_ids_are_replaced() {
        let req = Request::get("/")
            .header(X_CORRELATION_ID, "one")
            .header(X_CORRELATION_ID, "two")
            .body(Body::empty())
            .unwrap();
        let (header, _) = call(req).await;
        assert!(is_uuid_v7(&header));
    }

    #[tokio::test]
    async fn empty_id_is_replaced() {
        let (header, _) = call(with_id(b"")).await;
        assert!(is_uuid_v7(&header));
    }

    #[test]
    fn rejected_sample_is_escaped_and_short() {
        let v = HeaderValue::from_bytes(&[b'a'; 500]).unwrap();
        assert_eq!(sample(&v).len(), REJECTED_SAMPLE_LEN);
        let v = HeaderValue::from_bytes(b"\"}{\xff").unwrap();
        assert_eq!(sample(&v), "\\\"}{\\xff");
    }

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn with_traceparent(tp: &str, ts: Option<&str>) -> Request<Body> {
        let mut b = Request::get("/").header(TRACEPARENT, tp);
        if let Some(ts) = ts {
            b = b.header(TRACESTATE, ts);
        }
        b.body(Body::empty()).unwrap()
    }

    // R7
    #[tokio::test]
    async fn valid_traceparent_is_continued() {
        let (_, body) = call(with_traceparent(VALID, Some("congo=t61rcWkgMzE"))).await;
        assert_eq!(body[1], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(body[2], "congo=t61rcWkgMzE");
    }

    #[test]
    fn child_traceparent_keeps_trace_with_new_parent() {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(VALID));
        let ctx = TraceContext::from_headers(&h);
        let child = ctx.child_traceparent();
        let (trace, parent, flags) = parse_traceparent(child.as_bytes()).unwrap();
        assert_eq!(
            HexId::<32>::new(&trace).as_str(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_ne!(HexId::<16>::new(&parent).as_str(), "00f067aa0ba902b7");
        assert_eq!(flags, 1);
        assert_eq!(ctx.parent_id().unwrap().as_str(), "00f067aa0ba902b7");
    }

    // R8
    #[tokio::test]
    async fn invalid_traceparents_start_a_new_trace() {
        let cases = [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47366-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-001",
            "",
            "garbage",
        ];
        for tp in cases {
            let (_, body) = call(with_traceparent(tp, Some("congo=t61rcWkgMzE"))).await;
            assert_ne!(body[1], "4bf92f3577b34da6a3ce929d0e0e4736", "{tp}");
            assert_eq!(body[1].len(), 32);
            assert_ne!(body[1], "0".repeat(32));
            assert_eq!(
                body[2], "",
                "tracestate of an invalid traceparent must be dropped ({tp})"
            );
        }
    }

    #[tokio::test]
    async fn two_traceparents_start_a_new_trace() {
        let req = Request::get("/")
            .header(TRACEPARENT, VALID)
            .header(TRACEPARENT, VALID)
            .body(Body::empty())
            .unwrap();
        let (_, body) = call(req).await;
        assert_ne!(body[1], "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    // R9
    #[tokio::test]
    async fn future_version_is_read_by_its_first_fields() {
        let tp = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future";
        let (_, body) = call(with_traceparent(tp, None)).await;
        assert_eq!(body[1], "4bf92f3577b34da6a3ce929d0e0e4736");
        let tp = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (_, body) = call(with_traceparent(tp, None)).await;
        assert_eq!(body[1], "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    // R10
    #[tokio::test]
    async fn tracestate_is_bounded() {
        let many: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
        let (_, body) = call(with_traceparent(VALID, Some(&many.join(",")))).await;
        assert_eq!(body[2].split(',').count(), 32);
        assert!(body[2].starts_with("k0=v,k1=v"));

        let big: Vec<String> = (0..20)
            .map(|i| format!("k{i}={}", "v".repeat(200)))
            .collect();
        let (_, body) = call(with_traceparent(VALID, Some(&big.join(",")))).await;
        assert_eq!(body[2], "", "every member is over 128 chars");

        let mixed = format!("a=1,big={},b=2", "v".repeat(600));
        let (_, body) = call(with_traceparent(VALID, Some(&mixed))).await;
        assert_eq!(body[2], "a=1,b=2");

        let (_, body) = call(with_traceparent(VALID, Some("a=1,a=2"))).await;
        assert_eq!(body[2], "", "duplicate keys discard the list");
    }
}
