//! Protection: load shedding, body size limit, request timeout, panic catching.
//!
//! # The standard
//!
//! A service protects itself before it protects anything else:
//!
//! * **Load shedding.** Above `CHASSIS_MAX_CONCURRENT_REQUESTS` requests in
//!   flight, new requests are answered at once with 503 and `Retry-After: 1`,
//!   never queued: a queue in front of an overloaded service only adds latency
//!   to requests that will time out anyway, and a fast 503 lets the caller's
//!   retry or breaker do its job. The standard endpoints are never shed, so an
//!   overloaded instance still answers its liveness probe (and is not killed
//!   for being busy).
//! * **Body size.** A request body above `CHASSIS_MAX_BODY_BYTES` is refused
//!   with 413: at once when `Content-Length` says so, otherwise as soon as the
//!   streamed body passes the limit.
//! * **Timeout.** A request still running after
//!   `CHASSIS_REQUEST_TIMEOUT_SECS` is cancelled (its future is dropped, so
//!   the work stops) and answered with **504 Gateway Timeout**. A caller
//!   that sends `x-timeout-ms` (milliseconds it will still wait) shortens
//!   that: the request gets the smaller of the two, the deadline is put in
//!   the request as a [`Deadline`] for calls made on its behalf, and a
//!   request whose time is already up (`x-timeout-ms: 0`) is answered 504
//!   without starting the work. 504, not 408:
//!   408 says the *client* was too slow to send its request, whereas this is
//!   the service (usually waiting on its own dependencies) failing to answer
//!   in time, and callers' retry policies treat 504 as retryable for
//!   idempotent calls.
//! * **Panics.** A panicking handler answers 500 with a generic problem; the
//!   panic message goes to the log (with the request's correlation id), never
//!   to the client, and the process keeps serving.
//!
//! All four answer `application/problem+json` through
//! [`EnsureProblemLayer`](crate::problem::EnsureProblemLayer).
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use axum::{Router, body::Body, routing::get};
//! use chassis::protect::{CatchPanicLayer, LoadShedLayer, RequestTimeoutLayer};
//! use http::{Request, StatusCode};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let app = Router::new()
//!     .route("/slow", get(|| async { tokio::time::sleep(Duration::from_secs(60)).await; "done" }))
//!     .route("/panic", get(|| async { panic!("boom"); #[allow(unreachable_code)] "" }))
//!     .layer(
//!         ServiceBuilder::new()
//!             .layer(LoadShedLayer::new(100))
//!             .layer(RequestTimeoutLayer::new(Duration::from_secs(1)))
//!             .layer(CatchPanicLayer::new()),
//!     );
//! let res = app.clone().oneshot(Request::get("/slow").body(Body::empty()).unwrap()).await.unwrap();
//! assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
//! let res = app.oneshot(Request::get("/panic").body(Body::empty()).unwrap()).await.unwrap();
//! assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
//! # }
//! ```
//!
//! # Ordering
//!
//! Inside the metrics and access log (so shed, timed-out and panicked
//! requests are counted), outermost first: shed, body limit, timeout,
//! authentication and the rest, panic catcher around the handler.

use std::{
    fmt,
    future::Future,
    panic::AssertUnwindSafe,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use axum::{
    body::Body,
    response::{IntoResponse, Response},
};
use http::{Request, StatusCode, header};
use http_body::Body as _;
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::{Layer, Service};

use crate::{context::RequestContext, problem::Problem};

/// `Retry-After` seconds sent with a shed request.
const SHED_RETRY_AFTER_SECS: u32 = 1;

// === load shedding ===

/// Layer that answers 503 at once above a number of requests in flight.
#[derive(Debug, Clone)]
pub struct LoadShedLayer {
    state: Arc<ShedState>,
}

#[derive(Debug)]
struct ShedState {
    in_flight: AtomicUsize,
    max: usize,
}

impl LoadShedLayer {
    /// Allows at most `max` requests in flight; every service built by this
    /// layer (and its clones) shares the count.
    pub fn new(max: usize) -> Self {
        Self {
            state: Arc::new(ShedState {
                in_flight: AtomicUsize::new(0),
                max,
            }),
        }
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::Relaxed)
    }
}

impl<S> Layer<S> for LoadShedLayer {
    type Service = LoadShed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        LoadShed {
            inner,
            state: self.state.clone(),
        }
    }
}

/// Service built by [`LoadShedLayer`].
#[derive(Debug, Clone)]
pub struct LoadShed<S> {
    inner: S,
    state: Arc<ShedState>,
}

impl<S> LoadShed<S> {
    define_inner_service_accessors!();
}

/// One request's place in the in-flight count, given back on drop.
pub(crate) struct InFlight(Arc<ShedState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Release);
    }
}

impl<S, B> Service<Request<B>> for LoadShed<S>
where
    S: Service<Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = ShedFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        match admit(&self.state) {
            Some(permit) => ShedFuture {
                kind: Kind::Inner {
                    inner: self.inner.call(req),
                },
                permit: Some(permit),
            },
            None => ShedFuture {
                kind: Kind::Ready {
                    response: Some(shed()),
                },
                permit: None,
            },
        }
    }
}

impl LoadShedLayer {
    /// A place in the in-flight count; `None` when there is none, to be
    /// answered with [`shed`].
    pub(crate) fn admit(&self) -> Option<InFlight> {
        admit(&self.state)
    }
}

fn admit(state: &Arc<ShedState>) -> Option<InFlight> {
    let before = state.in_flight.fetch_add(1, Ordering::Acquire);
    let permit = InFlight(state.clone());
    if before >= state.max {
        drop(permit);
        tracing::debug!(max = state.max, "request shed");
        return None;
    }
    Some(permit)
}

/// The answer to a request shed for want of a place.
pub(crate) fn shed() -> Response {
    Problem::unavailable(SHED_RETRY_AFTER_SECS)
        .with_detail("The service is at capacity; retry later.")
        .vetted()
        .into_response()
}

pin_project! {
    /// The inner service's future, or an answer given without it.
    #[project = KindProj]
    pub(crate) enum Kind<F> {
        Inner { #[pin] inner: F },
        Ready { response: Option<Response> },
    }
}

impl<F, E> Kind<F>
where
    F: Future<Output = Result<Response, E>>,
{
    fn poll_kind(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Response, E>> {
        match self.project() {
            KindProj::Inner { inner } => inner.poll(cx),
            KindProj::Ready { response } => {
                Poll::Ready(Ok(response.take().expect("polled after completion")))
            }
        }
    }
}

pin_project! {
    /// Response future of [`LoadShed`].
    pub struct ShedFuture<F> {
        #[pin]
        kind: Kind<F>,
        permit: Option<InFlight>,
    }
}

impl<F> fmt::Debug for ShedFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShedFuture")
            .field("admitted", &self.permit.is_some())
            .finish()
    }
}

impl<F, E> Future for ShedFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = ready!(this.kind.poll_kind(cx));
        this.permit.take();
        Poll::Ready(res)
    }
}

// === body limit ===

/// Layer that refuses request bodies above a size with 413.
///
/// A declared `Content-Length` over the limit is refused before the handler
/// runs. A body without a length (chunked) is wrapped so that reading it fails
/// past the limit, which axum's extractors answer with 413. For a limit over
/// axum's own default for extractors (2 MiB), compose it with
/// `axum::extract::DefaultBodyLimit::max` of the same size (the service
/// builder does) so extractors accept what this layer lets through.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimitLayer {
    max: usize,
}

impl BodyLimitLayer {
    /// Allows bodies of at most `max` bytes.
    pub const fn new(max: usize) -> Self {
        Self { max }
    }
}

impl<S> Layer<S> for BodyLimitLayer {
    type Service = BodyLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BodyLimit {
            inner,
            max: self.max,
        }
    }
}

/// Service built by [`BodyLimitLayer`].
#[derive(Debug, Clone)]
pub struct BodyLimit<S> {
    inner: S,
    max: usize,
}

impl<S> BodyLimit<S> {
    define_inner_service_accessors!();
}

impl<S> Service<Request<Body>> for BodyLimit<S>
where
    S: Service<Request<Body>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = ReadyOr<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        match limit_body(&mut req, self.max) {
            Ok(()) => ReadyOr {
                kind: Kind::Inner {
                    inner: self.inner.call(req),
                },
            },
            Err(declared) => ReadyOr {
                kind: Kind::Ready {
                    response: Some(too_large(declared, self.max)),
                },
            },
        }
    }
}

/// Limits the body of `req` to `max` bytes; `Err` with the declared length
/// when it is over, to be answered with [`too_large`].
pub(crate) fn limit_body(req: &mut Request<Body>, max: usize) -> Result<(), u64> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > max as u64 => Err(n),
        // hyper enforces a declared length, and an empty body needs nothing.
        Some(_) => Ok(()),
        None if req.body().is_end_stream() => Ok(()),
        None => {
            let body = std::mem::take(req.body_mut());
            *req.body_mut() = Body::new(http_body_util::Limited::new(body, max));
            Ok(())
        }
    }
}

pin_project! {
    /// Response future of [`BodyLimit`].
    pub struct ReadyOr<F> {
        #[pin]
        kind: Kind<F>,
    }
}

impl<F> fmt::Debug for ReadyOr<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReadyOr")
    }
}

impl<F, E> Future for ReadyOr<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().kind.poll_kind(cx)
    }
}

// === timeout ===

/// Layer that answers 504 when a request takes longer than a timeout.
#[derive(Debug, Clone, Copy)]
pub struct RequestTimeoutLayer {
    timeout: Duration,
}

impl RequestTimeoutLayer {
    /// Cancels requests after `timeout`.
    pub const fn new(timeout: Duration) -> Self {
        Self { timeout }
    }
}

impl<S> Layer<S> for RequestTimeoutLayer {
    type Service = RequestTimeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestTimeout {
            inner,
            timeout: self.timeout,
        }
    }
}

/// Service built by [`RequestTimeoutLayer`].
#[derive(Debug, Clone)]
pub struct RequestTimeout<S> {
    inner: S,
    timeout: Duration,
}

impl<S> RequestTimeout<S> {
    define_inner_service_accessors!();
}

impl<S, B> Service<Request<B>> for RequestTimeout<S>
where
    S: Service<Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = TimeoutFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let deadline = deadline(&mut req, self.timeout, tokio::time::Instant::now());
        let inner = deadline.is_ok().then(|| self.inner.call(req));
        TimeoutFuture {
            inner,
            sleep: None,
            deadline,
        }
    }
}

/// The answer to a request whose declared body length is over `max`.
pub(crate) fn too_large(declared: u64, max: usize) -> Response {
    Problem::new(StatusCode::PAYLOAD_TOO_LARGE)
        .with_detail(format!(
            "The request body is {declared} bytes; the limit is {max} bytes."
        ))
        .into_response()
}

/// When a request must be answered, and the timeout that makes it so.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Due {
    at: tokio::time::Instant,
    timeout: Duration,
}

/// The deadline of `req`: `timeout` from `now`, or sooner when the caller's
/// `x-timeout-ms` says so (then also put in the request as a [`Deadline`]).
/// `Err` when the caller has already stopped waiting.
pub(crate) fn deadline<B>(
    req: &mut Request<B>,
    timeout: Duration,
    now: tokio::time::Instant,
) -> Result<Due, Due> {
    let Some(caller) = RequestContext::of_request(req).caller_timeout() else {
        return Ok(Due {
            at: now + timeout,
            timeout,
        });
    };
    if caller.is_zero() {
        // The caller has stopped waiting: do not start the work.
        tracing::debug!("the caller's deadline had passed; request not started");
        return Err(Due {
            at: now,
            timeout: caller,
        });
    }
    let timeout = timeout.min(caller);
    req.extensions_mut().insert(Deadline(now + timeout));
    Ok(Due {
        at: now + timeout,
        timeout,
    })
}

/// The answer to a request whose caller had stopped waiting before it began.
pub(crate) fn too_late() -> Response {
    Problem::new(StatusCode::GATEWAY_TIMEOUT)
        .with_detail("The caller's deadline had passed before the request started.")
        .vetted()
        .into_response()
}

/// Polls the timer of a request whose work is not done: the 504 answer once
/// `due` has passed. The timer is created on the first wait, so a request
/// answered in one poll never touches it.
pub(crate) fn poll_due(
    sleep: &mut Option<Pin<Box<Sleep>>>,
    due: Due,
    cx: &mut Context<'_>,
) -> Poll<Response> {
    let sleep = sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due.at)));
    match sleep.as_mut().poll(cx) {
        Poll::Ready(()) => {
            tracing::warn!(
                timeout_ms = due.timeout.as_millis() as u64,
                "request timed out"
            );
            Poll::Ready(
                Problem::new(StatusCode::GATEWAY_TIMEOUT)
                    .with_detail("The request did not complete in time.")
                    .vetted()
                    .into_response(),
            )
        }
        Poll::Pending => Poll::Pending,
    }
}

pub use crate::context::X_TIMEOUT_MS;

/// The instant by which a request must be answered, when the caller sent
/// `x-timeout-ms` (a request extension, for calls made on its behalf).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline(pub tokio::time::Instant);

pin_project! {
    /// Response future of [`RequestTimeout`].
    pub struct TimeoutFuture<F> {
        #[pin]
        inner: Option<F>,
        // Created only when the inner future first waits, so a request
        // answered in one poll never touches the timer; boxed, so that the
        // future of every request does not carry the timer's size.
        sleep: Option<Pin<Box<Sleep>>>,
        // `Err` when the caller had stopped waiting (and `inner` is `None`).
        deadline: Result<Due, Due>,
    }
}

impl<F> fmt::Debug for TimeoutFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimeoutFuture")
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl<F, E> Future for TimeoutFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let (Some(inner), Ok(due)) = (this.inner.as_pin_mut(), *this.deadline) else {
            return Poll::Ready(Ok(too_late()));
        };
        if let Poll::Ready(res) = inner.poll(cx) {
            return Poll::Ready(res);
        }
        poll_due(this.sleep, due, cx).map(Ok)
    }
}

// === panics ===

/// Layer that turns a panic in the inner service into a 500 problem.
#[derive(Debug, Clone, Copy, Default)]
pub struct CatchPanicLayer {
    _priv: (),
}

impl CatchPanicLayer {
    /// Creates the layer.
    pub const fn new() -> Self {
        Self { _priv: () }
    }
}

impl<S> Layer<S> for CatchPanicLayer {
    type Service = CatchPanic<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CatchPanic { inner }
    }
}

/// Service built by [`CatchPanicLayer`].
#[derive(Debug, Clone)]
pub struct CatchPanic<S> {
    inner: S,
}

impl<S> CatchPanic<S> {
    define_inner_service_accessors!();
}

impl<S, B> Service<Request<B>> for CatchPanic<S>
where
    S: Service<Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = PanicFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.inner.call(req))) {
            Ok(inner) => PanicFuture {
                kind: Kind::Inner { inner },
            },
            Err(_) => PanicFuture {
                kind: Kind::Ready {
                    response: Some(panicked()),
                },
            },
        }
    }
}

pin_project! {
    /// Response future of [`CatchPanic`].
    pub struct PanicFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

impl<F> fmt::Debug for PanicFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PanicFuture")
    }
}

fn panicked() -> Response {
    metrics::counter!("http_server_panics_total").increment(1);
    Problem::internal().vetted().into_response()
}

impl<F, E> Future for PanicFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let kind = self.project().kind;
        match std::panic::catch_unwind(AssertUnwindSafe(|| kind.poll_kind(cx))) {
            Ok(poll) => poll,
            Err(_) => Poll::Ready(Ok(panicked())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::{Router, routing::get};
    use std::sync::Arc;
    use tokio::sync::Notify;
    use tower::{ServiceBuilder, ServiceExt};

    fn get_req(uri: &str) -> Request<Body> {
        Request::get(uri).body(Body::empty()).unwrap()
    }

    #[tokio::test]
    async fn sheds_above_the_limit_and_recovers() {
        let release = Arc::new(Notify::new());
        let r = release.clone();
        let shed = LoadShedLayer::new(2);
        let app = Router::new()
            .route(
                "/",
                get(move || {
                    let r = r.clone();
                    async move {
                        r.notified().await;
                        "ok"
                    }
                }),
            )
            .layer(shed.clone());
        let a = tokio::spawn(app.clone().oneshot(get_req("/")));
        let b = tokio::spawn(app.clone().oneshot(get_req("/")));
        while shed.in_flight() < 2 {
            tokio::task::yield_now().await;
        }
        let res = app.clone().oneshot(get_req("/")).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(res.headers()[header::RETRY_AFTER], "1");
        assert_eq!(
            res.headers()[header::CONTENT_TYPE],
            crate::problem::CONTENT_TYPE
        );
        assert_eq!(shed.in_flight(), 2);
        release.notify_waiters();
        assert_eq!(a.await.unwrap().unwrap().status(), 200);
        assert_eq!(b.await.unwrap().unwrap().status(), 200);
        assert_eq!(shed.in_flight(), 0);
        let c = tokio::spawn(app.oneshot(get_req("/")));
        while shed.in_flight() < 1 {
            tokio::task::yield_now().await;
        }
        release.notify_waiters();
        assert_eq!(c.await.unwrap().unwrap().status(), 200);
    }

    #[tokio::test]
    async fn dropped_requests_free_their_place() {
        let shed = LoadShedLayer::new(1);
        let app = Router::new()
            .route("/", get(std::future::pending::<&'static str>))
            .layer(shed.clone());
        let fut = app.clone().oneshot(get_req("/"));
        let task = tokio::spawn(fut);
        while shed.in_flight() < 1 {
            tokio::task::yield_now().await;
        }
        task.abort();
        let _ = task.await;
        assert_eq!(shed.in_flight(), 0);
    }

    fn limited(max: usize) -> Router {
        Router::new()
            .route(
                "/",
                axum::routing::post(|body: bytes::Bytes| async move { body.len().to_string() }),
            )
            .layer(
                ServiceBuilder::new()
                    .layer(BodyLimitLayer::new(max))
                    .layer(axum::extract::DefaultBodyLimit::max(max)),
            )
    }

    #[tokio::test]
    async fn declared_length_over_limit_is_413_before_the_handler() {
        let req = Request::post("/")
            .header(header::CONTENT_LENGTH, "11")
            .body(Body::from("01234567890"))
            .unwrap();
        let res = limited(10).oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            res.headers()[header::CONTENT_TYPE],
            crate::problem::CONTENT_TYPE
        );
    }

    #[tokio::test]
    async fn streamed_body_over_limit_is_413() {
        let body = chunked(&["0123456", "789012"]);
        let res = limited(10)
            .oneshot(Request::post("/").body(body).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn bodies_within_limit_pass() {
        let res = limited(10)
            .oneshot(Request::post("/").body(Body::from("0123456789")).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let res = limited(10)
            .oneshot(Request::post("/").body(chunked(&["01234", "5"])).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(crate::problem::body_bytes(res.into_body()).await, "6");
    }

    /// A body of several chunks and no declared length.
    fn chunked(chunks: &[&'static str]) -> Body {
        struct Chunks(std::collections::VecDeque<bytes::Bytes>);
        impl http_body::Body for Chunks {
            type Data = bytes::Bytes;
            type Error = std::convert::Infallible;
            fn poll_frame(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
                Poll::Ready(self.0.pop_front().map(|b| Ok(http_body::Frame::data(b))))
            }
        }
        Body::new(Chunks(
            chunks
                .iter()
                .map(|c| bytes::Bytes::from_static(c.as_bytes()))
                .collect(),
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn slow_requests_get_504_and_are_cancelled() {
        struct Flag(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d = dropped.clone();
        let app = Router::new()
            .route(
                "/",
                get(move || {
                    let flag = Flag(d.clone());
                    async move {
                        tokio::time::sleep(Duration::from_secs(10)).await;
                        drop(flag);
                        "late"
                    }
                }),
            )
            .route("/fast", get(|| async { "fast" }))
            .layer(RequestTimeoutLayer::new(Duration::from_secs(5)));
        let res = app.clone().oneshot(get_req("/")).await.unwrap();
        assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(
            dropped.load(Ordering::SeqCst),
            "the handler's future was dropped"
        );
        let res = app.oneshot(get_req("/fast")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }

    #[tokio::test(start_paused = true)]
    async fn the_callers_deadline_shortens_the_timeout() {
        let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let s = started.clone();
        let app = Router::new()
            .route(
                "/",
                get(move |deadline: Option<axum::Extension<Deadline>>| {
                    s.fetch_add(1, Ordering::SeqCst);
                    async move {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        format!("{}", deadline.is_some())
                    }
                }),
            )
            .layer(RequestTimeoutLayer::new(Duration::from_secs(30)));
        let with = |v: &str| {
            Request::get("/")
                .header(X_TIMEOUT_MS, v)
                .body(Body::empty())
                .unwrap()
        };

        let start = tokio::time::Instant::now();
        let res = app.clone().oneshot(with("100")).await.unwrap();
        assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(start.elapsed(), Duration::from_millis(100));

        let res = app.clone().oneshot(with("0")).await.unwrap();
        assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            started.load(Ordering::SeqCst),
            1,
            "work whose time is up is not started"
        );

        // A longer caller budget than ours changes nothing; a deadline is set.
        let res = app.clone().oneshot(with("999999")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(crate::problem::body_bytes(res.into_body()).await, "true");
        // Invalid values are ignored.
        for bad in ["-1", "1.5", "abc", ""] {
            let res = app.clone().oneshot(with(bad)).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK, "{bad:?}");
            assert_eq!(crate::problem::body_bytes(res.into_body()).await, "false");
        }
    }

    #[tokio::test]
    async fn panics_become_500_without_the_message() {
        let app = Router::new()
            .route(
                "/",
                get(|| async {
                    if true {
                        panic!("secret database password is hunter2");
                    }
                    "unreachable"
                }),
            )
            .layer(CatchPanicLayer::new());
        let res = app.clone().oneshot(get_req("/")).await.unwrap();
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = crate::problem::body_bytes(res.into_body()).await;
        let text = String::from_utf8_lossy(&body);
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("\"status\":500"));
        // The service keeps serving.
        let res = app.oneshot(get_req("/")).await.unwrap();
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[tokio::test]
    async fn panics_in_call_are_caught() {
        #[derive(Clone)]
        struct Boom;
        impl Service<Request<Body>> for Boom {
            type Response = Response;
            type Error = std::convert::Infallible;
            type Future = std::future::Ready<Result<Response, Self::Error>>;
            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
                Poll::Ready(Ok(()))
            }
            fn call(&mut self, _: Request<Body>) -> Self::Future {
                panic!("in call")
            }
        }
        let res = CatchPanicLayer::new()
            .layer(Boom)
            .oneshot(get_req("/"))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
