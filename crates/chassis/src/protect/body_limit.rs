//! The body limit: [`BodyLimitLayer`] answers 413 to a body over the limit.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use axum::{
    body::Body,
    response::{IntoResponse, Response},
};
use http::{Request, StatusCode, header};
use http_body::Body as _;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::Kind;
use crate::problem::Problem;

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

/// The answer to a request whose declared body length is over `max`.
pub(crate) fn too_large(declared: u64, max: usize) -> Response {
    Problem::new(StatusCode::PAYLOAD_TOO_LARGE)
        .with_detail(format!(
            "The request body is {declared} bytes; the limit is {max} bytes."
        ))
        .into_response()
}
