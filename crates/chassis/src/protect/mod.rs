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

mod body_limit;
mod panic;
mod shed;
mod timeout;

pub use body_limit::{BodyLimit, BodyLimitLayer, ReadyOr};
pub(crate) use body_limit::{limit_body, too_large};
pub use panic::{CatchPanic, CatchPanicLayer, PanicFuture};
pub(crate) use shed::{InFlight, Kind, KindProj, shed};
pub use shed::{LoadShed, LoadShedLayer, ShedFuture};
pub use timeout::{Deadline, RequestTimeout, RequestTimeoutLayer, TimeoutFuture, X_TIMEOUT_MS};
pub(crate) use timeout::{Due, deadline, poll_due, too_late};

#[cfg(test)]
mod tests;
