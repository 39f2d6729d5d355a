//! The service builder: a router in, a production service out.
//!
//! # The standard
//!
//! Every service has the same shape, so that any engineer can operate any
//! service:
//!
//! * a name (`[a-z][a-z0-9-]*`, at most 63 characters) and an API version;
//!   its API lives under `/<name>/v<N>/...`, so several versions can be served
//!   side by side and a gateway can route by prefix;
//! * the standard endpoints at the root, outside the API: `GET /health/live`,
//!   `GET /health/ready`, `GET /metrics`, `GET /info` (never shed, never
//!   authenticated, never audited); `/health/ready` shows each check's name
//!   and state to anyone, and its errors only on `/health/ready?detail` to a
//!   bearer token holding `<service>::view:health` ([`health_permission`];
//!   see [`crate::health`]);
//! * the same layers, in the same order, on every request (see
//!   `docs/architecture.md` and [Ordering](#ordering));
//! * configuration from `CHASSIS_*` variables, JSON logs, graceful shutdown.
//!
//! # Example
//!
//! The whole of a service:
//!
//! ```no_run
//! use axum::extract::Path;
//! use chassis::{api::{self, Api}, service::ServiceBuilder};
//!
//! async fn greet(Path(name): Path<String>) -> String {
//!     format!("hello, {name}")
//! }
//!
//! #[tokio::main]
//! async fn main() -> std::process::ExitCode {
//!     ServiceBuilder::new("hello", 1)
//!         .api(Api::new().route(api::get("/greetings/{name}", greet).public().summary("Greet someone").response_as::<String>(200, "text/plain")))
//!         .build_info(chassis::build_info!())
//!         .run()
//!         .await
//! }
//! ```
//!
//! And how a test drives it without a socket:
//!
//! ```
//! use axum::body::Body;
//! use chassis::{api::{self, Api}, config::Config, service::ServiceBuilder};
//! use http::Request;
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let service = ServiceBuilder::new("hello", 1)
//!     .api(Api::new().route(api::get("/greetings", || async { "hello" }).public().response_as::<String>(200, "text/plain")))
//!     .config(Config::default())
//!     .build()
//!     .unwrap();
//! let app = service.router();
//! let res = app.clone().oneshot(Request::get("/hello/v1/greetings").body(Body::empty()).unwrap()).await.unwrap();
//! assert_eq!(res.status(), 200);
//! assert!(res.headers().contains_key("x-correlation-id"));
//! let res = app.oneshot(Request::get("/nope").body(Body::empty()).unwrap()).await.unwrap();
//! assert_eq!(res.status(), 404);
//! assert_eq!(res.headers()["content-type"], "application/problem+json");
//! # }
//! ```
//!
//! # Ordering
//!
//! Outermost first, for every request:
//!
//! 1. [`SetCorrelationIdLayer`]: id and trace context;
//! 2. [`EnsureProblemLayer`]: every error becomes problem+json with the id;
//! 3. [`ObserveLayer`]: request span, RED metrics, access log;
//!
//! and for API routes only:
//!
//! 4. [`AuditLayer`]: one audit event per call;
//! 5. [`LoadShedLayer`], [`BodyLimitLayer`], [`RequestTimeoutLayer`];
//! 6. per path, the guard of [`crate::api`]: a method the path does not
//!    declare is answered 405; then authentication, path validation,
//!    authorization;
//! 7. [`CatchPanicLayer`](crate::protect::CatchPanicLayer);
//! 8. the layers added with [`ServiceBuilder::api_layer`], first added
//!    outermost, around the handler.
//!
//! The panic catcher sits around the handler rather than outermost so that a
//! panic is measured, logged and answered like any other 500, with the
//! correlation id; the layers outside it are the chassis' own and do not
//! panic on any input.
//!
//! The builder applies 1-3 as one layer and 4-5 as another (the same code,
//! without handing the request down at each step, and with one response
//! future for each group instead of one per layer) and, for each API path,
//! 1-7 as one level of axum's routing, which boxes a route once per level.
//!
//! [`SetCorrelationIdLayer`]: crate::correlation::SetCorrelationIdLayer
//! [`EnsureProblemLayer`]: crate::problem::EnsureProblemLayer
//! [`ObserveLayer`]: crate::telemetry::ObserveLayer
//! [`AuditLayer`]: crate::audit::AuditLayer
//! [`LoadShedLayer`]: crate::protect::LoadShedLayer
//! [`BodyLimitLayer`]: crate::protect::BodyLimitLayer
//! [`RequestTimeoutLayer`]: crate::protect::RequestTimeoutLayer

mod builder;
mod endpoints;
mod info;
mod run;
mod stack;

pub use builder::{BuildError, ServiceBuilder};
pub use endpoints::health_permission;
pub use info::BuildInfo;
pub use run::{EXIT_SOFTWARE, ServeError, Service};
