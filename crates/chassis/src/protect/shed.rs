//! Load shedding: [`LoadShedLayer`] answers 503 at once above a number of
//! requests in flight.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
};

use axum::response::{IntoResponse, Response};
use http::Request;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::problem::Problem;

/// `Retry-After` seconds sent with a shed request.
const SHED_RETRY_AFTER_SECS: u32 = 1;

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
    pub(super) fn poll_kind(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Response, E>> {
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
