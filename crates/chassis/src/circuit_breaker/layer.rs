//! The tower layer: [`CircuitBreakerLayer`], its service and response
//! future, and the rule that classifies HTTP results.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
};

use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::{CircuitBreaker, CircuitOpen, Outcome, Permit};
use crate::BoxError;

/// The default rule for HTTP: errors and 5xx are failures, the rest success.
pub fn http_outcome<B>(result: &Result<http::Response<B>, BoxError>) -> Outcome {
    match result {
        Ok(res) if res.status().is_server_error() => Outcome::Failure,
        Ok(_) => Outcome::Success,
        Err(_) => Outcome::Failure,
    }
}

/// A classifier that is a plain function, the type of [`http_outcome`].
pub type ClassifyFn<R> = fn(&Result<R, BoxError>) -> Outcome;

/// Layer putting a [`CircuitBreaker`] in front of a service. `C` decides the
/// outcome of each call from its result (see
/// [`with_classifier`](Self::with_classifier)); it is cloned per call, so a
/// function or a closure over cheap values costs nothing.
#[derive(Clone)]
pub struct CircuitBreakerLayer<C> {
    breaker: CircuitBreaker,
    classify: C,
}

impl<C> fmt::Debug for CircuitBreakerLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerLayer")
            .field("breaker", &self.breaker)
            .finish_non_exhaustive()
    }
}

impl<B> CircuitBreakerLayer<ClassifyFn<http::Response<B>>> {
    /// A layer with the HTTP classifier ([`http_outcome`]).
    pub fn http(breaker: CircuitBreaker) -> Self {
        Self {
            breaker,
            classify: http_outcome::<B>,
        }
    }
}

impl<C> CircuitBreakerLayer<C> {
    /// A layer deciding outcomes with `classify`, a
    /// `Fn(&Result<Response, BoxError>) -> Outcome`.
    pub fn with_classifier(breaker: CircuitBreaker, classify: C) -> Self {
        Self { breaker, classify }
    }
}

impl<S, C: Clone> Layer<S> for CircuitBreakerLayer<C> {
    type Service = CircuitBreakerService<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreakerService {
            inner,
            breaker: self.breaker.clone(),
            classify: self.classify.clone(),
        }
    }
}

/// Service built by [`CircuitBreakerLayer`].
#[derive(Clone)]
pub struct CircuitBreakerService<S, C> {
    inner: S,
    breaker: CircuitBreaker,
    classify: C,
}

impl<S, C> fmt::Debug for CircuitBreakerService<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerService")
            .field("breaker", &self.breaker)
            .finish_non_exhaustive()
    }
}

impl<S, C, Req> Service<Req> for CircuitBreakerService<S, C>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: Fn(&Result<S::Response, BoxError>) -> Outcome + Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        let phase = match self.breaker.try_acquire() {
            Ok(permit) => Phase::Running {
                fut: self.inner.call(req),
                permit: Some(permit),
                classify: self.classify.clone(),
            },
            Err(open) => Phase::Refused {
                error: Some(Box::new(open)),
            },
        };
        ResponseFuture { phase }
    }
}

pin_project! {
    /// Response future of [`CircuitBreakerService`].
    pub struct ResponseFuture<F, C> {
        #[pin]
        phase: Phase<F, C>,
    }
}

pin_project! {
    #[project = PhaseProj]
    enum Phase<F, C> {
        Running { #[pin] fut: F, permit: Option<Permit>, classify: C },
        Refused { error: Option<Box<CircuitOpen>> },
    }
}

impl<F, C> fmt::Debug for ResponseFuture<F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, C, R, E> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<R, E>>,
    E: Into<BoxError>,
    C: Fn(&Result<R, BoxError>) -> Outcome,
{
    type Output = Result<R, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().phase.project() {
            PhaseProj::Running {
                fut,
                permit,
                classify,
            } => {
                let result = ready!(fut.poll(cx)).map_err(Into::into);
                if let Some(permit) = permit.take() {
                    permit.record(classify(&result));
                }
                Poll::Ready(result)
            }
            PhaseProj::Refused { error } => {
                Poll::Ready(Err(error.take().expect("polled after completion")))
            }
        }
    }
}
