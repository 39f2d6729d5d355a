//! The inner part of the client stack: retry, breaker, bulkhead, attempt
//! timeout, failure injection and the connection pool (TLS through
//! [`ClientTls`]).

use std::{
    future::Future,
    pin::Pin,
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

use super::{Settings, Stack};
use crate::{
    BoxError,
    bulkhead::{Bulkhead, BulkheadLayer},
    circuit_breaker::{CircuitBreaker, CircuitBreakerLayer},
    fault::FaultLayer,
    protect::X_TIMEOUT_MS,
    retry::RetryPolicy,
    tls::ClientTls,
};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The instant the whole call must end by (a request extension).
#[derive(Debug, Clone, Copy)]
pub(super) struct CallDeadline(pub(super) Instant);

/// An attempt was cut by its timeout.
#[derive(Debug, thiserror::Error)]
#[error("attempt timed out after {0:?}")]
pub(super) struct AttemptTimedOut(pub(super) Duration);

/// The connection pool failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum TransportError {
    #[error("{0}")]
    Connection(String),
    #[error("{0}")]
    Body(String),
}

pub(super) fn stack(
    s: &Settings,
    tls: &ClientTls,
    policy: RetryPolicy,
    breaker: CircuitBreaker,
    bulkhead: Bulkhead,
) -> Stack {
    let connector = tls.connector(Some(s.attempt_timeout));
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
    let attempt = AttemptTimeoutLayer(s.attempt_timeout);
    let fault = s.fault.clone().map(FaultLayer::new);
    let inner = ServiceBuilder::new()
        .layer(RetryLayer::new(policy))
        .layer(CircuitBreakerLayer::http(breaker))
        .layer(BulkheadLayer::new(bulkhead))
        .layer(attempt);
    match fault {
        Some(fault) => BoxCloneSyncService::new(inner.layer(fault).service(pool)),
        None => BoxCloneSyncService::new(inner.service(pool)),
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
            let res = fut
                .await
                .map_err(|e| TransportError::Connection(crate::tls::error_chain(&e)))?;
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

/// Bounds each attempt by the per-attempt timeout and what is left of the
/// call's deadline, and tells the downstream in `x-timeout-ms`.
#[derive(Debug, Clone, Copy)]
struct AttemptTimeoutLayer(Duration);

impl<S> Layer<S> for AttemptTimeoutLayer {
    type Service = AttemptTimeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AttemptTimeout {
            inner,
            timeout: self.0,
        }
    }
}

#[derive(Debug, Clone)]
struct AttemptTimeout<S> {
    inner: S,
    timeout: Duration,
}

impl<S, B> Service<Request<B>> for AttemptTimeout<S>
where
    S: Service<Request<B>, Error = BoxError>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = BoxFuture<Result<S::Response, BoxError>>;

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
        let fut = self.inner.call(req);
        Box::pin(async move {
            match tokio::time::timeout(timeout, fut).await {
                Ok(result) => result,
                Err(_) => Err(AttemptTimedOut(timeout).into()),
            }
        })
    }
}
