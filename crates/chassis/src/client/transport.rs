//! The inner part of the client stack: retry, breaker, bulkhead, the
//! attempt step (its timeout, its `traceparent` and client span), failure
//! injection and the connection pool (TLS through [`ClientTls`]).

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder, retry::RetryLayer, util::BoxCloneSyncService};

use super::{Settings, Stack, balance::Balancer};
use crate::{
    BoxError,
    bulkhead::{Bulkhead, BulkheadLayer},
    circuit_breaker::{CircuitBreaker, CircuitBreakerLayer},
    context::{TRACEPARENT, TraceContext},
    fault::FaultLayer,
    protect::X_TIMEOUT_MS,
    retry::RetryPolicy,
    tls::ClientTls,
};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The instant the whole call must end by (a request extension).
#[derive(Debug, Clone, Copy)]
pub(super) struct CallDeadline(pub(super) Instant);

/// The trace of the work a call is made for (a request extension): each
/// attempt is a child span of it.
#[derive(Debug, Clone)]
pub(super) struct CallTrace(pub(super) TraceContext);

/// An attempt was cut by its timeout.
#[derive(Debug, thiserror::Error)]
#[error("attempt timed out after {0:?}")]
pub(super) struct AttemptTimedOut(pub(super) Duration);

/// The connection pool failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum TransportError {
    /// No connection could be made: the request was not sent.
    #[error("{0}")]
    Connect(String),
    #[error("{0}")]
    Connection(String),
    #[error("{0}")]
    Body(String),
}

pub(super) fn stack(
    s: &Settings,
    name: &Arc<str>,
    tls: &ClientTls,
    policy: RetryPolicy,
    breaker: CircuitBreaker,
    bulkhead: Bulkhead,
    balancer: Option<Balancer>,
) -> Stack {
    let server_name = balancer.as_ref().and_then(Balancer::server_name);
    let connector = tls.connector_for(Some(s.attempt_timeout), server_name);
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(s.pool_idle_timeout)
        .pool_max_idle_per_host(s.pool_max_idle)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector);
    let pool = Pool {
        client,
        max_bytes: s.max_response_bytes,
    };
    let attempt = AttemptLayer {
        timeout: s.attempt_timeout,
        downstream: name.clone(),
    };
    let fault = s.fault.clone().map(FaultLayer::new);
    let inner = ServiceBuilder::new()
        .layer(RetryLayer::new(policy))
        .layer(CircuitBreakerLayer::http(breaker))
        .layer(BulkheadLayer::new(bulkhead));
    // One address: the stack as it always was, without the balancing step
    // (no lock, no allocation per call).
    match (balancer, fault) {
        (None, Some(fault)) => {
            BoxCloneSyncService::new(inner.layer(attempt).layer(fault).service(pool))
        }
        (None, None) => BoxCloneSyncService::new(inner.layer(attempt).service(pool)),
        (Some(balancer), Some(fault)) => BoxCloneSyncService::new(
            inner
                .layer(balancer)
                .layer(attempt)
                .layer(fault)
                .service(pool),
        ),
        (Some(balancer), None) => {
            BoxCloneSyncService::new(inner.layer(balancer).layer(attempt).service(pool))
        }
    }
}

/// hyper-util's pool, reading the body whole up to a limit.
#[derive(Clone)]
struct Pool {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    max_bytes: usize,
}

impl Service<Request<Full<Bytes>>> for Pool {
    type Response = Response<Bytes>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response<Bytes>, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        let fut = self.client.request(req);
        let max = self.max_bytes;
        Box::pin(async move {
            let res = fut.await.map_err(|e| {
                let message = crate::tls::error_chain(&e);
                if e.is_connect() {
                    TransportError::Connect(message)
                } else {
                    TransportError::Connection(message)
                }
            })?;
            let (parts, body) = res.into_parts();
            let body = Limited::new(body, max)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        TransportError::Body(format!("response body larger than {max} bytes"))
                    } else {
                        TransportError::Connection(format!("reading the body: {e}"))
                    }
                })?
                .to_bytes();
            Ok(Response::from_parts(parts, body))
        })
    }
}

/// One attempt: bounded by the per-attempt timeout and what is left of the
/// call's deadline, which the downstream is told in `x-timeout-ms`; sent
/// with a `traceparent` naming the attempt's own span, recorded as a client
/// span when the trace is sampled and spans are exported (so retries show
/// as separate spans under the work that made the call).
#[derive(Debug, Clone)]
struct AttemptLayer {
    timeout: Duration,
    downstream: Arc<str>,
}

impl<S> Layer<S> for AttemptLayer {
    type Service = Attempt<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Attempt {
            inner,
            timeout: self.timeout,
            downstream: self.downstream.clone(),
        }
    }
}

#[derive(Debug, Clone)]
struct Attempt<S> {
    inner: S,
    timeout: Duration,
    #[cfg_attr(not(feature = "otel"), allow(dead_code))]
    downstream: Arc<str>,
}

impl<S, B> Service<Request<B>> for Attempt<S>
where
    S: Service<Request<B>, Response = Response<Bytes>, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<Bytes>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response<Bytes>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let now = Instant::now();
        let mut timeout = self.timeout;
        if let Some(deadline) = req.extensions().get::<CallDeadline>() {
            timeout = timeout.min(deadline.0.saturating_duration_since(now));
        }
        // Whole milliseconds, rounded down, and at least 1 so that the
        // downstream does not refuse a call that still has some time.
        let ms = u64::try_from(timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        req.headers_mut()
            .insert(X_TIMEOUT_MS, HeaderValue::from(ms));
        let attempt = req.extensions().get::<CallTrace>().map(|t| t.0.child());
        if let Some(attempt) = &attempt {
            req.headers_mut().insert(TRACEPARENT, attempt.traceparent());
        }
        #[cfg(feature = "otel")]
        let span = attempt.map(|t| client_span(t, &req, &self.downstream));
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = match tokio::time::timeout(timeout, fut).await {
                Ok(result) => result,
                Err(_) => Err(AttemptTimedOut(timeout).into()),
            };
            #[cfg(feature = "otel")]
            if let Some(mut span) = span {
                match &result {
                    Ok(res) => {
                        let status = res.status().as_u16();
                        span.set_attribute("http.response.status_code", i64::from(status));
                        if status >= 400 {
                            span.set_error(status.to_string());
                        }
                    }
                    Err(e) if e.is::<AttemptTimedOut>() => span.set_error("timeout"),
                    Err(_) => span.set_error("connection"),
                }
            }
            result
        })
    }
}

/// The client span of one attempt (OpenTelemetry HTTP client conventions):
/// named after the method, with the method, the server's address and port,
/// the URL without its query, and the downstream's name as `peer.service`.
#[cfg(feature = "otel")]
fn client_span<B>(trace: TraceContext, req: &Request<B>, downstream: &str) -> crate::otel::Span {
    // OpenTelemetry's name for a method outside the standard set.
    let method = crate::metrics::method_label_of(crate::metrics::method_index(req.method()));
    let mut span = crate::otel::Span::begin(
        trace,
        opentelemetry::trace::SpanKind::Client,
        false,
        method,
        std::time::SystemTime::now(),
    );
    if span.is_recording() {
        let uri = req.uri();
        span.set_attribute("http.request.method", method);
        if let Some(host) = uri.host() {
            span.set_attribute("server.address", host.to_owned());
        }
        let port = uri
            .port_u16()
            .unwrap_or(if uri.scheme_str() == Some("https") {
                443
            } else {
                80
            });
        span.set_attribute("server.port", i64::from(port));
        span.set_attribute(
            "url.full",
            format!(
                "{}://{}{}",
                uri.scheme_str().unwrap_or("http"),
                uri.authority().map_or("", |a| a.as_str()),
                uri.path()
            ),
        );
        span.set_attribute("peer.service", downstream.to_owned());
    }
    span
}
