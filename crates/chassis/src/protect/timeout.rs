//! The timeout: [`RequestTimeoutLayer`] answers 504 when a request takes
//! longer than its deadline, the server's or the caller's.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use axum::response::{IntoResponse, Response};
use http::{Request, StatusCode};
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::{Layer, Service};

use crate::{context::RequestContext, problem::Problem};

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
        // Counted from when the request was received, as in the builder.
        let received = RequestContext::with(&mut req, |ctx| ctx.received());
        let deadline = deadline(&mut req, self.timeout, received);
        let inner = deadline.is_ok().then(|| self.inner.call(req));
        TimeoutFuture {
            inner,
            sleep: None,
            deadline,
        }
    }
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
    let due = RequestContext::with(req, |ctx| {
        let due = match ctx.caller_timeout() {
            None => Ok(Due {
                at: now + timeout,
                timeout,
            }),
            // The caller has stopped waiting: do not start the work.
            Some(caller) if caller.is_zero() => Err(Due {
                at: now,
                timeout: caller,
            }),
            Some(caller) => {
                let timeout = timeout.min(caller);
                Ok(Due {
                    at: now + timeout,
                    timeout,
                })
            }
        };
        ctx.set_deadline(due.map_or_else(|d| d.at, |d| d.at));
        (due, ctx.caller_timeout().is_some())
    });
    match due {
        (Err(_), _) => tracing::debug!("the caller's deadline had passed; request not started"),
        (Ok(due), true) => {
            req.extensions_mut().insert(Deadline(due.at));
        }
        (Ok(_), false) => {}
    }
    due.0
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
