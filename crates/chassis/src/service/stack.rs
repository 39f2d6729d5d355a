//! The request path the builder composes: the steps of the public layers,
//! called in order.
//!
//! Each standard is a step with a request hook (run in `call`, before the
//! layers inside) and a response hook (run when the answer is ready). The
//! public layers each run one step; the builder runs the same hooks, in the
//! order below, in two services ([`Front`] for every route, [`Protect`] for
//! the API's), so a request is handed down twice instead of seven times and
//! wrapped in three futures instead of seven. `tests/equivalence.rs` holds
//! the two to the same answers, log lines, audit events and metrics.
//!
//! | # | step | request hook | response hook | public layer |
//! |---|---|---|---|---|
//! | 1 | correlation | [`correlation::assign`] makes the [`RequestContext`](crate::context::RequestContext) | the id on the response | `SetCorrelationIdLayer` |
//! | 2 | problem | | [`problem::ResponseFuture`]: every error as problem+json | `EnsureProblemLayer` |
//! | 3 | observe | [`telemetry::begin`], the ids entered around the call | the access line and RED metrics when the body ends | `ObserveLayer` |
//! | 4 | audit | [`audit::Pending::begin`] opens the decision note | the event, when answered or dropped | `AuditLayer` |
//! | 5 | shed | [`LoadShedLayer::admit`] (503) | the place in flight given back | `LoadShedLayer` |
//! | 6 | body limit | [`protect::limit_body`] (413) | | `BodyLimitLayer` |
//! | 7 | timeout | [`protect::deadline`] (504 at once when the caller stopped waiting) | [`protect::poll_due`] (504) | `RequestTimeoutLayer` |
//! | 8 | guard (`api/guard.rs`) | [`Guard`](crate::api::Guard): 405, then authentication (401), path validation (404) and authorization (403), the decision in the note | | per path, from [`Api::into_router`](crate::api::Api::into_router) |
//! | 9 | panic (`protect/panic.rs`) | | [`PanicFuture`](protect::PanicFuture): a panic as a 500 | `CatchPanicLayer` |
//!
//! The guard and the panic catcher sit per path, inside these, as
//! [`ApiPath::guard_layer`](crate::api::ApiPath::guard_layer) puts them
//! for the builder and [`Api::into_router`](crate::api::Api::into_router)
//! for a stack composed by hand.
//!
//! [`mount`] puts the steps around the routes; it is the only code that
//! orders them. Outermost first: [`Front`] (1-3), the service's outer
//! layers, [`Protect`] (4-7), axum's extractor limit and the injected faults
//! when configured, the guard (8) and the panic catcher (9), the service's
//! own layers, the handlers; the standard endpoints and the fallback get
//! [`Front`] only.
//!
//! The routes of a deprecated API version get one more step, outermost,
//! in the same level: [`DeprecatedLayer`](super::version::DeprecatedLayer)
//! puts `Deprecation`, `Sunset` and `Link` on every answer (errors of the
//! steps inside included) and counts the call. The routes of other versions
//! are composed without it, so they pay nothing for it.

use std::{convert::Infallible, future::Future, pin::Pin, time::Duration};

use axum::{
    Router,
    extract::{DefaultBodyLimit, Request},
    response::Response,
    routing::{MethodRouter, Route},
};
use tower::{Layer, ServiceBuilder as Stack, layer::util::Identity};

use super::version::Served;
use crate::{
    api::{ApiPath, Guard},
    audit::{self, Auditor},
    correlation,
    fault::FaultLayer,
    metrics::HttpMetrics,
    problem,
    protect::{self, CatchPanic, LoadShedLayer},
    telemetry,
};

/// A layer of the service's own, as the builder keeps it: applied to the
/// handlers of one path.
pub(super) type ApiLayer = Box<dyn Fn(MethodRouter) -> MethodRouter + Send>;

/// The body limit axum's extractors apply unless told otherwise.
const AXUM_DEFAULT_BODY_LIMIT: usize = 2 * 1024 * 1024;

/// What [`mount`] puts around the routes, configured.
pub(super) struct Layers<'a> {
    /// Steps 1-3, on every route.
    pub(super) front: FrontLayer,
    /// Steps 4-7, on the API's routes.
    pub(super) protect: ProtectLayer,
    /// The faults `CHASSIS_FAULT_*` asks for, if any.
    pub(super) fault: Option<FaultLayer>,
    /// The service's outer layers, first added outermost.
    pub(super) outer: &'a [ApiLayer],
    /// The service's layers around its handlers, first added outermost.
    pub(super) around_handlers: &'a [ApiLayer],
}

/// The application: each API path of each version with its handlers
/// inside the whole stack, and `standard` (the standard endpoints and the
/// fallback) inside [`Front`].
///
/// Every layer level axum adds boxes the route again, which costs a clone
/// and an allocation per request; so each API path gets all of its layers
/// as one level, and the other routes the first three.
pub(super) fn mount(
    api: Vec<(Served, Vec<ApiPath>)>,
    standard: Router,
    layers: &Layers<'_>,
) -> Router {
    // axum's extractors have a limit of their own, 2 MiB by default; it
    // is raised only when ours is higher, since setting it costs an
    // extension insert on every request.
    let max_body = layers.protect.max_body;
    let extractor_limit =
        (max_body > AXUM_DEFAULT_BODY_LIMIT).then(|| DefaultBodyLimit::max(max_body));
    // The optional layers are chosen here, once, rather than per request
    // through `option_layer`, whose `Either` moves every request again.
    let router = match (extractor_limit, layers.fault.clone()) {
        (None, None) => mount_api(api, Identity::new(), layers),
        (Some(limit), None) => mount_api(api, limit, layers),
        (None, Some(fault)) => mount_api(api, fault, layers),
        (Some(limit), Some(fault)) => {
            mount_api(api, Stack::new().layer(limit).layer(fault), layers)
        }
    };
    router.merge(standard.layer(layers.front.clone()))
}

/// Each API path inside the whole stack, with `optional` (the extractor
/// limit and the faults, or nothing) between the protection and the guard.
fn mount_api<L>(api: Vec<(Served, Vec<ApiPath>)>, optional: L, layers: &Layers<'_>) -> Router
where
    L: Layer<Guard<CatchPanic<Route>>> + Clone + Send + Sync + 'static,
    L::Service: tower::Service<Request, Response = Response, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    <L::Service as tower::Service<Request>>::Future: Send + 'static,
{
    let mut router = Router::new();
    let service = layers.front.metrics.service();
    for (served, paths) in api {
        let protect = ProtectLayer {
            api_version: Some(served.version.number()),
            ..layers.protect.clone()
        };
        for path in paths {
            let inner = Stack::new()
                .layer(protect.clone())
                .layer(optional.clone())
                .layer(path.guard_layer());
            let mut handlers = path.router;
            for layer in layers.around_handlers.iter().rev() {
                handlers = layer(handlers);
            }
            let front = layers.front.clone();
            let deprecated = served.layer(service, &path.path);
            let handlers = if layers.outer.is_empty() {
                match deprecated {
                    None => handlers.layer(Stack::new().layer(front).layer(inner)),
                    Some(d) => handlers.layer(Stack::new().layer(d).layer(front).layer(inner)),
                }
            } else {
                // The service's outer layers sit between the front and the
                // rest: one more level per route.
                let mut guarded = handlers.layer(inner);
                for layer in layers.outer.iter().rev() {
                    guarded = layer(guarded);
                }
                match deprecated {
                    None => guarded.layer(front),
                    Some(d) => guarded.layer(Stack::new().layer(d).layer(front)),
                }
            };
            router = router.route(&path.path, handlers);
        }
    }
    router
}

/// [`SetCorrelationIdLayer`](crate::correlation::SetCorrelationIdLayer),
/// [`EnsureProblemLayer`](crate::problem::EnsureProblemLayer) and
/// [`ObserveLayer`](telemetry::ObserveLayer), in that order, as one
/// layer: the request is handed down once instead of three times, the
/// problem layer gets the id without looking it up, and its future also puts
/// the id on the response, so two futures wrap the inner one instead of
/// three, each built in place.
#[derive(Clone)]
pub(super) struct FrontLayer {
    pub(super) metrics: HttpMetrics,
}

impl<S> tower::Layer<S> for FrontLayer {
    type Service = Front<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Front {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// Service built by [`FrontLayer`].
#[derive(Clone)]
pub(super) struct Front<S> {
    inner: S,
    metrics: HttpMetrics,
}

impl<S, B> tower::Service<http::Request<B>> for Front<S>
where
    S: tower::Service<http::Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = problem::ResponseFuture<telemetry::ResponseFuture<S::Future>>;

    #[inline]
    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let id = correlation::assign(&mut req);
        let guard = telemetry::begin(&self.metrics, &req);
        let _ids = guard.enter_ids();
        // Built in place: the inner future is not moved from one wrapper
        // into the next.
        problem::ResponseFuture::with_id_header(
            telemetry::ResponseFuture::new(self.inner.call(req), guard),
            id,
        )
    }
}

/// [`AuditLayer`](crate::audit::AuditLayer),
/// [`LoadShedLayer`], [`BodyLimitLayer`](protect::BodyLimitLayer) and
/// [`RequestTimeoutLayer`](protect::RequestTimeoutLayer), in that
/// order, as one layer over the same code: the request is handed down once
/// instead of four times, and one future does the work of four.
#[derive(Clone)]
pub(super) struct ProtectLayer {
    pub(super) auditor: Auditor,
    /// The API version of the routes it is around, for their audit events.
    pub(super) api_version: Option<u32>,
    pub(super) shed: LoadShedLayer,
    pub(super) max_body: usize,
    pub(super) timeout: Duration,
}

impl<S> tower::Layer<S> for ProtectLayer {
    type Service = Protect<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Protect {
            inner,
            layer: self.clone(),
        }
    }
}

/// Service built by [`ProtectLayer`].
#[derive(Clone)]
pub(super) struct Protect<S> {
    inner: S,
    layer: ProtectLayer,
}

impl<S> tower::Service<http::Request<axum::body::Body>> for Protect<S>
where
    S: tower::Service<http::Request<axum::body::Body>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = ProtectFuture<S::Future>;

    #[inline]
    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<axum::body::Body>) -> Self::Future {
        let pending = audit::Pending::begin(&self.layer.auditor, self.layer.api_version, &mut req);
        let answer = |response, pending| ProtectFuture {
            kind: protect::Kind::Ready {
                response: Some(response),
            },
            sleep: None,
            due: None,
            permit: None,
            pending: Some(pending),
        };
        let Some(permit) = self.layer.shed.admit() else {
            return answer(protect::shed(), pending);
        };
        if let Err(declared) = protect::limit_body(&mut req, self.layer.max_body) {
            return answer(protect::too_large(declared, self.layer.max_body), pending);
        }
        // The deadline counts from when the request was received.
        let Ok(due) = protect::deadline(&mut req, self.layer.timeout, pending.start()) else {
            return answer(protect::too_late(), pending);
        };
        ProtectFuture {
            kind: protect::Kind::Inner {
                inner: self.inner.call(req),
            },
            sleep: None,
            due: Some(due),
            permit: Some(permit),
            pending: Some(pending),
        }
    }
}

pin_project_lite::pin_project! {
    /// Response future of [`Protect`].
    pub(super) struct ProtectFuture<F> {
        // The inner service's future, or the answer given without it (shed,
        // too large, or the caller had stopped waiting).
        #[pin]
        kind: protect::Kind<F>,
        // The timeout's timer, created on the first wait.
        sleep: Option<Pin<Box<tokio::time::Sleep>>>,
        due: Option<protect::Due>,
        permit: Option<protect::InFlight>,
        pending: Option<audit::Pending>,
    }
}

impl<F, E> Future for ProtectFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use protect::KindProj;
        let this = self.project();
        let result = match (this.kind.project(), *this.due) {
            (KindProj::Inner { inner }, Some(due)) => match inner.poll(cx) {
                std::task::Poll::Ready(result) => result,
                std::task::Poll::Pending => {
                    Ok(std::task::ready!(protect::poll_due(this.sleep, due, cx)))
                }
            },
            (KindProj::Inner { inner }, None) => std::task::ready!(inner.poll(cx)),
            (KindProj::Ready { response }, _) => {
                Ok(response.take().expect("polled after completion"))
            }
        };
        // In the order of the separate layers: the place in the in-flight
        // count is given back, then the call is audited (in place).
        *this.permit = None;
        if let Some(pending) = this.pending.as_mut() {
            pending.answered(&result);
            *this.pending = None;
        }
        std::task::Poll::Ready(result)
    }
}
