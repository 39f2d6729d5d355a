//! Retries: only what is safe, only within a budget.
//!
//! # The standard
//!
//! A failed call to a downstream may be retried only when retrying cannot do
//! harm and cannot make an outage worse:
//!
//! * **only idempotent calls**: `GET`, `HEAD`, `OPTIONS`, `PUT`, `DELETE`, or
//!   a request carrying an `Idempotency-Key` (the downstream deduplicates),
//!   or one the caller marked [`RetrySafe`] because the downstream documents
//!   the operation as idempotent; or any call whose attempt failed with
//!   [`NotSent`] (it never reached the downstream);
//! * **only retryable failures**: a transport error or timeout, or a 502,
//!   503, 504 or 429 answer; never a call the circuit breaker or the bulkhead
//!   refused (that is the point of them), never another 4xx;
//! * **with backoff and full jitter**: attempt *n* waits a random time up to
//!   `base × 2ⁿ` (capped), so a crowd of clients does not retry in step; a
//!   `Retry-After` from the downstream is honoured instead;
//! * **within a budget**: retries may add at most a fixed share of the
//!   original requests (default 20 %, plus a small floor), tower's
//!   [`TpsBudget`]; when a downstream fails hard, the budget runs out and
//!   load stops multiplying;
//! * with at most `max_attempts` attempts in all (default 3).
//!
//! Put the retry layer **outside** the circuit breaker (each attempt is then
//! counted by the breaker, and an open breaker stops the retries at once)
//! and inside the overall deadline.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use chassis::retry::{RetryPolicy, RetryBudget};
//!
//! let budget = RetryBudget::default();
//! let policy = RetryPolicy::new(budget).max_attempts(3).backoff(Duration::from_millis(50), Duration::from_secs(1));
//! let layer = tower::retry::RetryLayer::new(policy);
//! # let _ = layer;
//! ```

use std::{fmt, sync::Arc, time::Duration};

use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use tokio::time::Sleep;
use tower::retry::{
    Policy,
    budget::{Budget, TpsBudget},
};

use crate::{BoxError, bulkhead::BulkheadFull, circuit_breaker::CircuitOpen};

/// `Idempotency-Key`.
pub const IDEMPOTENCY_KEY: http::HeaderName = http::HeaderName::from_static("idempotency-key");

/// A retry budget shared by every call to one downstream.
#[derive(Clone)]
pub struct RetryBudget(Arc<TpsBudget>);

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RetryBudget")
    }
}

impl RetryBudget {
    /// Retries may add `percent` (0 to 1) of the requests of the last `ttl`,
    /// plus `min_per_sec` retries per second.
    pub fn new(ttl: Duration, min_per_sec: u32, percent: f32) -> Self {
        Self(Arc::new(TpsBudget::new(ttl, min_per_sec, percent)))
    }
}

impl Default for RetryBudget {
    /// 20 % over 10 s, with a floor of 1 retry per second.
    fn default() -> Self {
        Self::new(Duration::from_secs(10), 1, 0.2)
    }
}

/// The retry rules of the [module docs](self), as a tower [`Policy`].
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    budget: RetryBudget,
    max_attempts: u32,
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl RetryPolicy {
    /// Rules drawing on `budget`: 3 attempts, backoff from 50 ms to 2 s.
    pub fn new(budget: RetryBudget) -> Self {
        Self {
            budget,
            max_attempts: 3,
            base: Duration::from_millis(50),
            cap: Duration::from_secs(2),
            attempt: 0,
        }
    }

    /// At most `n` attempts in all (at least 1).
    #[must_use]
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// Backoff from `base`, doubling, capped at `cap`.
    #[must_use]
    pub fn backoff(mut self, base: Duration, cap: Duration) -> Self {
        self.base = base;
        self.cap = cap.max(base);
        self
    }

    fn delay(&self, headers: Option<&HeaderMap>) -> Duration {
        if let Some(secs) = headers
            .and_then(|h| h.get(header::RETRY_AFTER))
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            // Honoured, but never more than a minute.
            return Duration::from_secs(secs.min(60));
        }
        let exp = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.cap);
        // Full jitter: anywhere between zero and the exponential bound.
        exp.mul_f64(fastrand::f64())
    }
}

/// A request extension by which the caller vouches that sending the request
/// twice has the effect of sending it once, although its method is not
/// idempotent and it carries no `Idempotency-Key`: for example
/// `POST /reservations/{id}/confirm`, where confirming a confirmed
/// reservation changes nothing. The downstream's API documentation must say
/// so; when in doubt, send an `Idempotency-Key` instead.
///
/// [`RequestBuilder::retry_safe`](crate::client::RequestBuilder::retry_safe)
/// sets it on a downstream call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetrySafe;

/// The error of an attempt that never reached the downstream: no
/// connection could be made, so nothing was sent. [`RetryPolicy`] retries
/// it whatever the method, since sending the request again cannot do
/// anything twice. The client's address choice marks connection failures
/// so when the downstream has [several addresses](crate::client#several-addresses),
/// where the retry goes to another one.
#[derive(Debug)]
pub struct NotSent(BoxError);

impl NotSent {
    /// Marks `error` as the error of a request that was not sent.
    pub fn new(error: BoxError) -> Self {
        Self(error)
    }

    /// The error that kept the request from being sent.
    pub fn error(&self) -> &BoxError {
        &self.0
    }
}

impl fmt::Display for NotSent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "not sent: {}", self.0)
    }
}

impl std::error::Error for NotSent {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// Whether a request may be sent twice: an idempotent method, an
/// `Idempotency-Key`, or the [`RetrySafe`] extension.
pub fn is_retry_safe<B>(req: &Request<B>) -> bool {
    matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    ) || req.headers().contains_key(IDEMPOTENCY_KEY)
        || req.extensions().get::<RetrySafe>().is_some()
}

fn retryable_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 502 | 503 | 504)
}

impl<B: Clone, R> Policy<Request<B>, Response<R>, BoxError> for RetryPolicy {
    type Future = Sleep;

    fn retry(
        &mut self,
        req: &mut Request<B>,
        result: &mut Result<Response<R>, BoxError>,
    ) -> Option<Self::Future> {
        if self.attempt == 0 {
            // One deposit per original request.
            self.budget.0.deposit();
        }
        let (headers, unsent) = match result {
            Ok(res) if retryable_status(res.status()) => (Some(res.headers()), false),
            Ok(_) => return None,
            Err(e) if e.is::<CircuitOpen>() || e.is::<BulkheadFull>() => return None,
            Err(e) => (None, e.is::<NotSent>()),
        };
        if !(unsent || is_retry_safe(req))
            || self.attempt + 1 >= self.max_attempts
            || !self.budget.0.withdraw()
        {
            return None;
        }
        let delay = self.delay(headers);
        self.attempt += 1;
        Some(tokio::time::sleep(delay))
    }

    fn clone_request(&mut self, req: &Request<B>) -> Option<Request<B>> {
        let mut clone = Request::new(req.body().clone());
        *clone.method_mut() = req.method().clone();
        *clone.uri_mut() = req.uri().clone();
        *clone.version_mut() = req.version();
        *clone.headers_mut() = req.headers().clone();
        *clone.extensions_mut() = req.extensions().clone();
        Some(clone)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tower::{Layer, ServiceExt, retry::RetryLayer, service_fn};

    use super::*;
    use crate::circuit_breaker::{CircuitBreaker, CircuitBreakerLayer, Config};

    /// A downstream answering `status` (with `Retry-After` when given) and
    /// counting hits.
    fn downstream(
        hits: Arc<AtomicUsize>,
        status: StatusCode,
        retry_after: Option<&'static str>,
    ) -> impl tower::Service<
        Request<String>,
        Response = Response<()>,
        Error = BoxError,
        Future: Send,
    > + Clone {
        service_fn(move |_req: Request<String>| {
            hits.fetch_add(1, Ordering::SeqCst);
            async move {
                let mut res = Response::new(());
                *res.status_mut() = status;
                if let Some(ra) = retry_after {
                    res.headers_mut()
                        .insert(header::RETRY_AFTER, ra.parse().unwrap());
                }
                Ok::<_, BoxError>(res)
            }
        })
    }

    fn req(method: Method, key: bool) -> Request<String> {
        let mut r = Request::builder().method(method).uri("http://127.0.0.1/x");
        if key {
            r = r.header(IDEMPOTENCY_KEY, "k-1");
        }
        r.body(String::new()).unwrap()
    }

    fn generous() -> RetryPolicy {
        RetryPolicy::new(RetryBudget::new(Duration::from_secs(10), 1000, 10.0)).max_attempts(3)
    }

    #[tokio::test(start_paused = true)]
    async fn idempotent_calls_are_retried_others_not() {
        for (method, key, want) in [
            (Method::GET, false, 3),
            (Method::PUT, false, 3),
            (Method::POST, false, 1),
            (Method::PATCH, false, 1),
            (Method::POST, true, 3),
        ] {
            let hits = Arc::new(AtomicUsize::new(0));
            let svc = RetryLayer::new(generous()).layer(downstream(
                hits.clone(),
                StatusCode::SERVICE_UNAVAILABLE,
                None,
            ));
            let res = svc.oneshot(req(method.clone(), key)).await.unwrap();
            assert_eq!(res.status(), 503);
            assert_eq!(hits.load(Ordering::SeqCst), want, "{method} key={key}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_post_marked_retry_safe_is_retried() {
        let hits = Arc::new(AtomicUsize::new(0));
        let svc = RetryLayer::new(generous()).layer(downstream(
            hits.clone(),
            StatusCode::SERVICE_UNAVAILABLE,
            None,
        ));
        let mut marked = req(Method::POST, false);
        marked.extensions_mut().insert(RetrySafe);
        assert!(is_retry_safe(&marked));
        let res = svc.oneshot(marked).await.unwrap();
        assert_eq!(res.status(), 503);
        assert_eq!(hits.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_was_not_sent_is_retried_whatever_its_method() {
        for (unsent, want) in [(true, 3), (false, 1)] {
            let hits = Arc::new(AtomicUsize::new(0));
            let counter = hits.clone();
            let svc =
                RetryLayer::new(generous()).layer(service_fn(move |_req: Request<String>| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    async move {
                        let refused: BoxError = "connection refused".into();
                        Err::<Response<()>, BoxError>(if unsent {
                            Box::new(NotSent::new(refused))
                        } else {
                            refused
                        })
                    }
                }));
            let err = svc.oneshot(req(Method::POST, false)).await.unwrap_err();
            assert_eq!(err.is::<NotSent>(), unsent);
            assert_eq!(hits.load(Ordering::SeqCst), want, "unsent={unsent}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn only_retryable_answers_are_retried() {
        for (status, want) in [
            (StatusCode::BAD_GATEWAY, 3),
            (StatusCode::GATEWAY_TIMEOUT, 3),
            (StatusCode::TOO_MANY_REQUESTS, 3),
            (StatusCode::INTERNAL_SERVER_ERROR, 1),
            (StatusCode::NOT_FOUND, 1),
            (StatusCode::OK, 1),
        ] {
            let hits = Arc::new(AtomicUsize::new(0));
            let svc = RetryLayer::new(generous()).layer(downstream(hits.clone(), status, None));
            let _ = svc.oneshot(req(Method::GET, false)).await;
            assert_eq!(hits.load(Ordering::SeqCst), want, "{status}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_honoured() {
        let hits = Arc::new(AtomicUsize::new(0));
        let svc = RetryLayer::new(generous().max_attempts(2)).layer(downstream(
            hits.clone(),
            StatusCode::SERVICE_UNAVAILABLE,
            Some("2"),
        ));
        let start = tokio::time::Instant::now();
        let _ = svc.oneshot(req(Method::GET, false)).await;
        assert_eq!(hits.load(Ordering::SeqCst), 2);
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_has_full_jitter_below_the_bound() {
        let p = RetryPolicy::new(RetryBudget::default())
            .backoff(Duration::from_millis(100), Duration::from_secs(1));
        for attempt in 0..6 {
            let p = RetryPolicy {
                attempt,
                ..p.clone()
            };
            let bound = Duration::from_millis(100 * (1 << attempt)).min(Duration::from_secs(1));
            for _ in 0..100 {
                assert!(p.delay(None) <= bound);
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_exhausted_budget_stops_retries() {
        // No floor and 10 %: ten calls earn about one retry.
        let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.1);
        let hits = Arc::new(AtomicUsize::new(0));
        let policy = RetryPolicy::new(budget).max_attempts(3);
        let svc = RetryLayer::new(policy).layer(downstream(
            hits.clone(),
            StatusCode::SERVICE_UNAVAILABLE,
            None,
        ));
        for _ in 0..20 {
            let _ = svc.clone().oneshot(req(Method::GET, false)).await;
        }
        let total = hits.load(Ordering::SeqCst);
        assert!(
            total <= 20 + 3,
            "retries stayed within the budget: {total} calls for 20 requests"
        );
        assert!(total >= 20);
    }

    #[tokio::test(start_paused = true)]
    async fn no_retry_while_the_breaker_is_open() {
        let breaker = CircuitBreaker::new("retry-test", Config::count(2).minimum_calls(2));
        for _ in 0..2 {
            breaker.try_acquire().unwrap().failure();
        }
        let hits = Arc::new(AtomicUsize::new(0));
        let inner = CircuitBreakerLayer::http(breaker).layer(downstream(
            hits.clone(),
            StatusCode::OK,
            None,
        ));
        let svc = RetryLayer::new(generous()).layer(inner);
        let err = svc.oneshot(req(Method::GET, false)).await.unwrap_err();
        assert!(err.is::<CircuitOpen>());
        assert_eq!(hits.load(Ordering::SeqCst), 0);
    }
}
