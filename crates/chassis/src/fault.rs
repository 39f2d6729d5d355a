//! Failure injection: add latency or failures on purpose.
//!
//! # The standard
//!
//! Resilience that was never exercised does not exist. A team proves that
//! its timeouts, retries, breakers and bulkheads work by making calls slow
//! or failing on purpose, in a test environment or a small share of
//! production traffic, as the companies that pioneered this did. The fault
//! layer is **off unless configured**, and then:
//!
//! * delays `delay_percent` % of the matching calls by `delay` (the request
//!   timeout still applies, so a long delay shows up as a 504);
//! * aborts `abort_percent` % of them with `abort_status` (default 503),
//!   without calling the handler, marked `x-fault-injected: abort`;
//! * matches the route templates listed (all API routes when none are).
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `CHASSIS_FAULT_DELAY_MS` | `0` | added latency |
//! | `CHASSIS_FAULT_DELAY_PERCENT` | `0` | share of calls delayed, 0-100 |
//! | `CHASSIS_FAULT_ABORT_PERCENT` | `0` | share of calls aborted, 0-100 |
//! | `CHASSIS_FAULT_ABORT_STATUS` | `503` | status of an aborted call |
//! | `CHASSIS_FAULT_ROUTES` | all API routes | comma-separated route templates, e.g. `/orders/v1/{account}/orders` |
//!
//! Injected faults are logged at `debug` and counted in
//! `faults_injected_total{kind}`.
//!
//! # Example
//!
//! ```
//! use axum::{Router, body::Body, routing::get};
//! use chassis::fault::{FaultConfig, FaultLayer};
//! use http::{Request, StatusCode};
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let always_abort = FaultConfig { abort_percent: 100.0, ..FaultConfig::default() };
//! let app = Router::new().route("/", get(|| async { "ok" })).layer(FaultLayer::new(always_abort));
//! let res = app.oneshot(Request::get("/").body(Body::empty()).unwrap()).await.unwrap();
//! assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
//! assert_eq!(res.headers()["x-fault-injected"], "abort");
//! # }
//! ```

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use axum::extract::MatchedPath;
use http::{HeaderValue, Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::{Layer, Service};

use crate::env::Reader;

/// What to inject; see the [module docs](self).
#[derive(Debug, Clone, PartialEq)]
pub struct FaultConfig {
    /// Added latency.
    pub delay: Duration,
    /// Share of calls delayed, 0 to 100.
    pub delay_percent: f64,
    /// Share of calls aborted, 0 to 100.
    pub abort_percent: f64,
    /// Status of an aborted call.
    pub abort_status: StatusCode,
    /// Route templates affected; empty for all.
    pub routes: Vec<String>,
}

impl Default for FaultConfig {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            delay_percent: 0.0,
            abort_percent: 0.0,
            abort_status: StatusCode::SERVICE_UNAVAILABLE,
            routes: Vec::new(),
        }
    }
}

/// A percentage from the environment, 0 to 100.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Percent(pub(crate) f64);

impl std::str::FromStr for Percent {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.parse::<f64>() {
            Ok(p) if (0.0..=100.0).contains(&p) => Ok(Self(p)),
            _ => Err("expected a number from 0 to 100".to_owned()),
        }
    }
}

/// An HTTP status of an error, 400 to 599.
#[derive(Debug, Clone, Copy)]
struct ErrorStatus(StatusCode);

impl std::str::FromStr for ErrorStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s
            .parse::<u16>()
            .ok()
            .and_then(|n| StatusCode::from_u16(n).ok())
        {
            Some(c) if c.is_client_error() || c.is_server_error() => Ok(Self(c)),
            _ => Err("expected a status from 400 to 599".to_owned()),
        }
    }
}

impl FaultConfig {
    /// Reads `CHASSIS_FAULT_*`; `None` (no injection) unless a delay or an
    /// abort share is set.
    pub fn read(r: &mut Reader<'_>) -> Option<Self> {
        Self::read_prefixed(r, "CHASSIS_FAULT_", true)
    }

    /// Reads `<prefix>DELAY_MS`, `<prefix>DELAY_PERCENT`,
    /// `<prefix>ABORT_PERCENT`, `<prefix>ABORT_STATUS` and, with `routes`,
    /// `<prefix>ROUTES`.
    pub(crate) fn read_prefixed(r: &mut Reader<'_>, prefix: &str, routes: bool) -> Option<Self> {
        let var = |suffix: &str| format!("{prefix}{suffix}");
        let delay_ms: u64 = r.optional(&var("DELAY_MS"), 0, "latency to inject, ms");
        let delay_percent = r.optional(
            &var("DELAY_PERCENT"),
            Percent(0.0),
            "share of calls delayed, 0-100",
        );
        let abort_percent = r.optional(
            &var("ABORT_PERCENT"),
            Percent(0.0),
            "share of calls aborted, 0-100",
        );
        let abort_status = r.optional(
            &var("ABORT_STATUS"),
            ErrorStatus(StatusCode::SERVICE_UNAVAILABLE),
            "status of aborted calls",
        );
        let routes: Option<String> = if routes {
            r.maybe(&var("ROUTES"), "route templates to affect, comma-separated")
        } else {
            None
        };
        let on = (delay_ms > 0 && delay_percent.0 > 0.0) || abort_percent.0 > 0.0;
        on.then(|| Self {
            delay: Duration::from_millis(delay_ms),
            delay_percent: delay_percent.0,
            abort_percent: abort_percent.0,
            abort_status: abort_status.0,
            routes: routes
                .map(|r| {
                    r.split(',')
                        .map(|s| s.trim().to_owned())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    fn applies(&self, route: Option<&MatchedPath>) -> bool {
        self.routes.is_empty() || route.is_some_and(|m| self.routes.iter().any(|r| r == m.as_str()))
    }
}

/// Layer injecting the faults of a [`FaultConfig`].
#[derive(Debug, Clone)]
pub struct FaultLayer {
    config: Arc<FaultConfig>,
}

impl FaultLayer {
    /// Injects `config`'s faults.
    pub fn new(config: FaultConfig) -> Self {
        Self {
            config: Arc::new(config),
        }
    }
}

impl<S> Layer<S> for FaultLayer {
    type Service = Fault<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Fault {
            inner,
            config: self.config.clone(),
        }
    }
}

/// Service built by [`FaultLayer`].
#[derive(Debug, Clone)]
pub struct Fault<S> {
    inner: S,
    config: Arc<FaultConfig>,
}

impl<S> Fault<S> {
    define_inner_service_accessors!();
}

fn chance(percent: f64) -> bool {
    percent > 0.0 && fastrand::f64() * 100.0 < percent
}

impl<S, B, RB> Service<Request<B>> for Fault<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone,
    RB: Default,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = FaultFuture<S, B>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let c = &self.config;
        if !c.applies(req.extensions().get::<MatchedPath>()) {
            return FaultFuture {
                state: Phase::Running {
                    fut: self.inner.call(req),
                },
            };
        }
        if chance(c.abort_percent) {
            metrics::counter!("faults_injected_total", "kind" => "abort").increment(1);
            tracing::debug!(status = c.abort_status.as_u16(), "fault injected: abort");
            let mut res = Response::new(RB::default());
            *res.status_mut() = c.abort_status;
            res.headers_mut()
                .insert("x-fault-injected", HeaderValue::from_static("abort"));
            return FaultFuture {
                state: Phase::Aborted {
                    response: Some(res),
                },
            };
        }
        if chance(c.delay_percent) && !c.delay.is_zero() {
            metrics::counter!("faults_injected_total", "kind" => "delay").increment(1);
            tracing::debug!(
                delay_ms = c.delay.as_millis() as u64,
                "fault injected: delay"
            );
            // The readied service goes with the request; a clone stays.
            let fresh = self.inner.clone();
            let readied = std::mem::replace(&mut self.inner, fresh);
            return FaultFuture {
                state: Phase::Delayed {
                    sleep: tokio::time::sleep(c.delay),
                    request: Some((readied, req)),
                },
            };
        }
        FaultFuture {
            state: Phase::Running {
                fut: self.inner.call(req),
            },
        }
    }
}

pin_project! {
    /// Response future of [`Fault`].
    pub struct FaultFuture<S: Service<Request<B>>, B> {
        #[pin]
        state: Phase<S, B>,
    }
}

pin_project! {
    #[project = PhaseProj]
    enum Phase<S: Service<Request<B>>, B> {
        Running { #[pin] fut: S::Future },
        Delayed { #[pin] sleep: Sleep, request: Option<(S, Request<B>)> },
        Aborted { response: Option<S::Response> },
    }
}

impl<S: Service<Request<B>>, B> fmt::Debug for FaultFuture<S, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultFuture").finish_non_exhaustive()
    }
}

impl<S, B> Future for FaultFuture<S, B>
where
    S: Service<Request<B>>,
{
    type Output = Result<S::Response, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                PhaseProj::Running { fut } => return fut.poll(cx),
                PhaseProj::Aborted { response } => {
                    return Poll::Ready(Ok(response.take().expect("polled after completion")));
                }
                PhaseProj::Delayed { sleep, request } => {
                    ready!(sleep.poll(cx));
                    let (mut inner, req) = request.take().expect("polled after completion");
                    let fut = inner.call(req);
                    this.state.set(Phase::Running { fut });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Env;
    use axum::{Router, body::Body, routing::get};
    use tower::ServiceExt;

    fn app(config: FaultConfig) -> Router {
        Router::new()
            .route("/a", get(|| async { "a" }))
            .route("/b", get(|| async { "b" }))
            .layer(FaultLayer::new(config))
    }

    async fn status(app: &Router, uri: &str) -> StatusCode {
        app.clone()
            .oneshot(Request::get(uri).body(Body::empty()).unwrap())
            .await
            .unwrap()
            .status()
    }

    #[tokio::test]
    async fn off_unless_configured() {
        let empty = Env::from_pairs::<&str, &str>([]);
        let mut r = Reader::new(&empty);
        assert!(FaultConfig::read(&mut r).is_none());
        let delay_only = Env::from_pairs([("CHASSIS_FAULT_DELAY_MS", "100")]);
        let mut r = Reader::new(&delay_only);
        assert!(
            FaultConfig::read(&mut r).is_none(),
            "a delay for 0 % of calls is off"
        );
        let env = Env::from_pairs([
            ("CHASSIS_FAULT_ABORT_PERCENT", "150"),
            ("CHASSIS_FAULT_ABORT_STATUS", "200"),
        ]);
        let mut r = Reader::new(&env);
        let _ = FaultConfig::read(&mut r);
        assert_eq!(r.finish().unwrap_err().problems().len(), 2);
    }

    #[tokio::test]
    async fn aborts_only_the_chosen_routes() {
        let env = Env::from_pairs([
            ("CHASSIS_FAULT_ABORT_PERCENT", "100"),
            ("CHASSIS_FAULT_ABORT_STATUS", "502"),
            ("CHASSIS_FAULT_ROUTES", "/a"),
        ]);
        let mut r = Reader::new(&env);
        let config = FaultConfig::read(&mut r).unwrap();
        let app = app(config);
        assert_eq!(status(&app, "/a").await, StatusCode::BAD_GATEWAY);
        assert_eq!(status(&app, "/b").await, StatusCode::OK);
    }

    #[tokio::test]
    async fn aborts_about_the_share_asked() {
        fastrand::seed(7);
        let app = app(FaultConfig {
            abort_percent: 30.0,
            ..FaultConfig::default()
        });
        let mut aborted = 0;
        for _ in 0..1000 {
            if status(&app, "/a").await != StatusCode::OK {
                aborted += 1;
            }
        }
        assert!((230..370).contains(&aborted), "{aborted} of 1000");
    }

    #[tokio::test(start_paused = true)]
    async fn delays_then_answers() {
        let app = app(FaultConfig {
            delay: Duration::from_millis(250),
            delay_percent: 100.0,
            ..FaultConfig::default()
        });
        let start = tokio::time::Instant::now();
        assert_eq!(status(&app, "/b").await, StatusCode::OK);
        assert_eq!(start.elapsed(), Duration::from_millis(250));
    }
}
