//! The panic catcher: [`CatchPanicLayer`] answers 500 when the handler
//! panics.

use std::{
    fmt,
    future::Future,
    panic::AssertUnwindSafe,
    pin::Pin,
    task::{Context, Poll},
};

use axum::response::{IntoResponse, Response};
use http::Request;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::Kind;
use crate::problem::Problem;

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
