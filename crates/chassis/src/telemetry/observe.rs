//! Request observation: [`ObserveLayer`] opens the request span, records the
//! RED metrics and writes the access line.

use std::{
    fmt::{self},
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
    time::SystemTime,
};

use axum::{body::Body, extract::MatchedPath, response::Response};
use bytes::Bytes;
use http::Request;
use http_body::{Body as _, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::{Layer, Service};
use tracing::Span;

use crate::{
    context::{HexId, RequestContext},
    metrics::{HttpMetrics, UNMATCHED, method_index},
};

use crate::log_line::{
    JsonLines, LineIds, json_lines, route_is_clean, with_line, write_field, write_u64,
};

use super::{
    ACCESS_TARGET, REQUEST_TARGET,
    json::{CurrentIds, RequestFields},
};

/// Layer that opens the request span, records RED metrics and writes the
/// access log; see the [module docs](crate::telemetry).
#[derive(Debug, Clone)]
pub struct ObserveLayer {
    metrics: HttpMetrics,
}

impl ObserveLayer {
    /// Records into `metrics`.
    pub fn new(metrics: HttpMetrics) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Observe {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// Service built by [`ObserveLayer`].
#[derive(Debug, Clone)]
pub struct Observe<S> {
    inner: S,
    metrics: HttpMetrics,
}

impl<S> Observe<S> {
    define_inner_service_accessors!();
}

/// Whether a route is one of the standard endpoints, whose access logs are
/// `debug`.
fn is_standard(route: &str) -> bool {
    matches!(
        route,
        "/health/live" | "/health/ready" | "/metrics" | "/info"
    )
}

impl<S, B> Service<Request<B>> for Observe<S>
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

    fn call(&mut self, req: Request<B>) -> Self::Future {
        observe(&mut self.inner, &self.metrics, req)
    }
}

/// What [`Observe`] does: calls `inner` with `req`, and returns its future
/// wrapped to enter the request's ids while polled and to record the request
/// at its end.
pub(crate) fn observe<S, B>(
    inner: &mut S,
    metrics: &HttpMetrics,
    mut req: Request<B>,
) -> ResponseFuture<S::Future>
where
    S: Service<Request<B>, Response = Response>,
{
    RequestContext::with(&mut req, |_| ());
    let guard = begin(metrics, &req);
    let _ids = guard.enter_ids();
    ResponseFuture::new(inner.call(req), guard)
}

/// Starts observing `req`, before the inner service is called: what
/// [`ResponseFuture`] records when the request ends.
pub(crate) fn begin<B>(metrics: &HttpMetrics, req: &Request<B>) -> Guard {
    let ids = req.extensions().get::<RequestContext>();
    let start = ids.map_or_else(Instant::now, RequestContext::received);
    let method = method_index(req.method());
    let route = req.extensions().get::<MatchedPath>().cloned();
    let route_str = route.as_ref().map_or(UNMATCHED, MatchedPath::as_str);
    let standard = is_standard(route_str);
    // Hex-encoded once for the span, the thread-local ids and the
    // access line.
    let trace_hex = ids.map(|c| c.trace().trace_id());
    let span_hex = ids.map(|c| c.trace().span_id());
    // The field values are only computed when the span is enabled (it is
    // not under `init`'s JSON log).
    let span = {
        let m = req.method().as_str();
        if standard {
            tracing::debug_span!(target: REQUEST_TARGET, "request", method = m, route = route_str, correlation_id = ids.map(|c| c.id().as_str()), trace_id = trace_hex.as_ref().map(HexId::as_str), span_id = span_hex.as_ref().map(HexId::as_str))
        } else {
            tracing::info_span!(target: REQUEST_TARGET, "request", method = m, route = route_str, correlation_id = ids.map(|c| c.id().as_str()), trace_id = trace_hex.as_ref().map(HexId::as_str), span_id = span_hex.as_ref().map(HexId::as_str))
        }
    };
    let fields = ids.zip(trace_hex.as_ref()).map(|(c, trace)| {
        let mut f = RequestFields::EMPTY;
        // All are ASCII by construction: copied without a UTF-8 check.
        f.correlation_id.set_ascii(c.id().header_value().as_bytes());
        f.trace_id.set_ascii(trace.as_bytes());
        f.span_id.set_ascii(c.trace().span_id().as_bytes());
        f
    });
    #[cfg(feature = "otel")]
    // Probes and scrapes of the standard endpoints start no span: they
    // would fill a tracing backend with traces of one span each.
    let server_span = ids
        .filter(|_| !standard)
        .and_then(|c| server_span(c, req, route_str, route.is_some()));
    // The access line of an API call is written directly when the
    // chassis' JSON log is installed; it needs the request's ids, which
    // `fields` holds.
    let direct = !standard && fields.is_some() && json_lines().is_some();
    metrics.active(method).increment(1.0);
    Guard {
        start,
        method,
        route,
        standard,
        direct,
        fields,
        span,
        #[cfg(feature = "otel")]
        server_span,
        status: None,
        metrics: metrics.clone(),
    }
}

/// The request's server span, when its trace is sampled and spans are
/// exported (OpenTelemetry HTTP semantic conventions): named after the
/// method and route template, with the method, route, scheme and server
/// address; the status is set when the request ends.
#[cfg(feature = "otel")]
fn server_span<B>(
    ctx: &RequestContext,
    req: &Request<B>,
    route: &str,
    matched: bool,
) -> Option<crate::otel::Span> {
    if !(ctx.trace().sampled() && crate::otel::enabled()) {
        return None;
    }
    let method = req.method().as_str().to_owned();
    let name = if matched {
        format!("{method} {route}")
    } else {
        method.clone()
    };
    // The request was received `elapsed` ago, by the monotonic clock.
    let start = SystemTime::now() - ctx.received().elapsed();
    let mut span = crate::otel::Span::begin(
        ctx.trace().clone(),
        opentelemetry::trace::SpanKind::Server,
        ctx.trace().parent_id().is_some(),
        name,
        start,
    );
    span.set_attribute("http.request.method", method);
    if matched {
        span.set_attribute("http.route", route.to_owned());
    }
    span.set_attribute(
        "url.scheme",
        req.uri().scheme_str().unwrap_or("http").to_owned(),
    );
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<http::uri::Authority>().ok());
    if let Some(authority) = host {
        span.set_attribute("server.address", authority.host().to_owned());
        if let Some(port) = authority.port_u16() {
            span.set_attribute("server.port", i64::from(port));
        }
    }
    Some(span)
}

/// Records the request when dropped: at the end of the body, when the
/// response is ready (bodies of known length), or when the client went away
/// first (status 499, as nginx logs it).
pub(crate) struct Guard {
    start: Instant,
    method: usize,
    route: Option<MatchedPath>,
    standard: bool,
    /// Whether the access line is written directly, see [`access_line`],
    /// with the ids in `fields`.
    direct: bool,
    /// The ids put in [`CURRENT`] while the request is polled.
    fields: Option<RequestFields>,
    /// The request span; disabled under [`init`]'s JSON log.
    span: Span,
    /// The OpenTelemetry server span, when the request's trace is sampled
    /// and exported.
    #[cfg(feature = "otel")]
    server_span: Option<crate::otel::Span>,
    status: Option<u16>,
    metrics: HttpMetrics,
}

/// Status recorded for a request whose client went away before the response.
impl Guard {
    /// Puts the request's ids where the log finds them until the result is
    /// dropped: around the `call` of the layers inside, so that whatever
    /// they log before their future first runs carries the ids too, as it
    /// does while the future is polled. Owned, so the future is still built
    /// in place.
    #[inline]
    pub(crate) fn enter_ids(&self) -> Option<CurrentIds> {
        self.fields.map(CurrentIds::enter)
    }
}

const CLIENT_CLOSED: u16 = 499;

impl Drop for Guard {
    fn drop(&mut self) {
        let elapsed = self.start.elapsed();
        let status = self.status.unwrap_or(CLIENT_CLOSED);
        #[cfg(feature = "otel")]
        if let Some(mut span) = self.server_span.take() {
            span.set_attribute("http.response.status_code", i64::from(status));
            if status >= 500 {
                span.set_error(status.to_string());
            } else if status == CLIENT_CLOSED {
                // The client went away: not the server's error, but worth
                // finding (OpenTelemetry leaves the status unset).
                span.set_attribute("error.type", "client_closed");
            }
        }
        self.metrics
            .record_route(self.route.as_ref(), self.method, status, elapsed);
        let route = self.route.as_ref().map_or(UNMATCHED, MatchedPath::as_str);
        self.metrics.active(self.method).decrement(1.0);
        let latency_us = elapsed.as_micros() as u64;
        let method = crate::metrics::method_label_of(self.method);
        if let (true, Some(ids), Some(lines)) = (self.direct, &self.fields, json_lines()) {
            if tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO) {
                // `unmatched` is a literal of this crate.
                let clean = self.route.as_ref().is_none_or(route_is_clean);
                access_line(lines, ids, method, (route, clean), status, latency_us);
            }
            return;
        }
        if self.span.is_disabled() {
            // No span to name as parent: the ids go the way they go for
            // the handler's events.
            let _ids = self.fields.map(CurrentIds::enter);
            if self.standard {
                tracing::debug!(target: ACCESS_TARGET, method, route, status, latency_us, "request");
            } else {
                tracing::info!(target: ACCESS_TARGET, method, route, status, latency_us, "request");
            }
            return;
        }
        // An explicit parent puts the event in the request span without
        // entering it.
        if self.standard {
            tracing::debug!(target: ACCESS_TARGET, parent: &self.span, method, route, status, latency_us, "request");
        } else {
            tracing::info!(target: ACCESS_TARGET, parent: &self.span, method, route, status, latency_us, "request");
        }
    }
}

/// The access line of an API call, as the `tracing` event in
/// [`Guard`]'s drop would render it through [`JsonLayer`], written to the
/// log directly: one line per request is the chassis' most frequent log
/// line, and this skips the dispatch, the span lookup and the field visitor.
pub(super) fn access_line(
    lines: &JsonLines,
    ids: &RequestFields,
    method: &str,
    (route, route_clean): (&str, bool),
    status: u16,
    latency_us: u64,
) {
    with_line(|buf| {
        lines.begin_line(
            buf,
            SystemTime::now(),
            ACCESS_TARGET,
            Some(LineIds {
                correlation_id: ids.correlation_id.as_bytes(),
                trace_id: ids.trace_id.as_bytes(),
                span_id: ids.span_id.as_bytes(),
            }),
            "request",
        );
        // An HTTP method is a token: no quote, backslash or control byte.
        write_field(buf, ",\"method\":\"", method, false);
        write_field(buf, ",\"route\":\"", route, !route_clean);
        buf.extend_from_slice(b",\"status\":");
        write_u64(buf, u64::from(status));
        buf.extend_from_slice(b",\"latency_us\":");
        write_u64(buf, latency_us);
        JsonLines::end_line(buf);
        lines.write(buf);
    });
}

pin_project! {
    /// Response future of [`Observe`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        guard: Option<Guard>,
    }
}

impl<F> ResponseFuture<F> {
    /// Observes `inner`, the future of the request `guard` was begun for.
    #[inline]
    pub(crate) fn new(inner: F, guard: Guard) -> Self {
        Self {
            inner,
            guard: Some(guard),
        }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = {
            let _ids = this
                .guard
                .as_ref()
                .and_then(|g| g.fields)
                .map(CurrentIds::enter);
            let _enter = this.guard.as_ref().map(|g| g.span.enter());
            ready!(this.inner.poll(cx))
        };
        // The guard is recorded where it lies (`*this.guard = None` drops it
        // in place); it is moved out only to follow a streamed body.
        let Some(guard) = this.guard.as_mut() else {
            return Poll::Ready(result);
        };
        match result {
            Ok(res) => {
                guard.status = Some(res.status().as_u16());
                let known_length = res.body().size_hint().exact().is_some();
                if known_length || res.body().is_end_stream() {
                    *this.guard = None;
                    Poll::Ready(Ok(res))
                } else {
                    let guard = this.guard.take();
                    Poll::Ready(Ok(
                        res.map(|body| Body::new(ObservedBody { inner: body, guard }))
                    ))
                }
            }
            Err(e) => {
                guard.status = Some(500);
                *this.guard = None;
                Poll::Ready(Err(e))
            }
        }
    }
}

pin_project! {
    /// A streaming response body that records the request when it ends.
    struct ObservedBody {
        #[pin]
        inner: Body,
        guard: Option<Guard>,
    }
}

impl http_body::Body for ObservedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if !matches!(frame, Some(Ok(_))) {
            this.guard.take();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
