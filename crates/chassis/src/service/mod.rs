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
//! # API versions
//!
//! A service serves one **current** version of its API
//! ([`ServiceBuilder::new`]'s number, routes added with
//! [`api`](ServiceBuilder::api)) and may serve older ones beside it, each
//! with [`version`](ServiceBuilder::version): its own prefix
//! `/<name>/v<N>`, route table, permission templates, audit and OpenAPI
//! document. The same route in two versions is two routes.
//!
//! **When to make a v2.** Only for a change an existing client could
//! break on: a field removed, renamed or retyped, a new required field in
//! a request, a changed meaning, stricter validation. A new optional field,
//! a new route or a new error code with an existing status is added to the
//! current version. A v2 serves the same data as v1 (one store, two
//! shapes), so a client can move one call at a time, and what v2 creates v1
//! can still read.
//!
//! **How long v1 lives.** Deprecate v1 when v2 ships
//! ([`ApiVersion::deprecated`]), and give it a sunset
//! ([`ApiVersion::sunset`]) far enough out for every known client to move:
//! six months is a usual floor for clients outside the team, and longer for
//! clients that ship to devices. The dates are the service's (its
//! settings, e.g. `ORDERS_V1_SUNSET` in the orders exemplar), never the
//! chassis'. Watch `http_server_deprecated_requests_total` and the audit
//! events' `api_version` (who still calls it) fall to zero; then a release
//! removes the version. The chassis keeps serving a version past its sunset
//! (and logs a warning at start): turning it off is a decision, not a
//! timer.
//!
//! **What a deprecated version answers.** Every answer of its routes
//! (errors too: 401, 403, 404, 405, 413, 422, 503, 504, and a 404 for a
//! path under its prefix that matches nothing) and of its OpenAPI document
//! carries, precomputed at build:
//!
//! | header | example | standard |
//! |---|---|---|
//! | `Deprecation` | `@1796083200` (a structured-field date: seconds since the epoch) | RFC 9745 |
//! | `Sunset` | `Wed, 30 Jun 2027 23:59:59 GMT` (an HTTP-date), when given | RFC 8594 |
//! | `Link` | `</orders/v2/openapi.json>; rel="successor-version"; type="application/json"` | RFC 5829 |
//! | | `<https://docs.example.com/orders/v1-to-v2>; rel="deprecation"`, when given ([`ApiVersion::deprecation_link`]) | RFC 9745 §3 |
//!
//! The successor is the newest version above it that is not deprecated
//! (so v1 points past a deprecated v2 to v3), linked by its OpenAPI
//! document: a per-route successor is not known (v2 may have reshaped the
//! routes), and the document is what a developer or a tool reads to move.
//! The `Link` is appended, so a page's own `rel="next"` stays. A version
//! that is not deprecated gets none of these headers and no extra layer.
//! Its document marks every operation `deprecated: true`, and its `info`
//! says since when, the sunset and the successor (`x-deprecated-at`,
//! `x-sunset`, `x-successor`). `/info` lists every version served
//! (`api_versions`: `version`, `prefix`, `openapi`, `deprecated`, and
//! `deprecated_at`, `sunset_at`, `successor` for an old one).
//!
//! **Clients** should watch for `Deprecation` on any answer: log it or
//! count it, and plan the move before `Sunset`. The chassis' own
//! [client](crate::client) does the first: the first answer with
//! `Deprecation` from a downstream is named in a warning (with its `Sunset`
//! and successor), and the call succeeds as always; a driver client built
//! with [`driver_client!`](crate::driver_client) keeps working against a
//! deprecated version until its sunset.
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
mod version;

pub use builder::{BuildError, ServiceBuilder};
pub use endpoints::health_permission;
pub use info::BuildInfo;
pub use run::{EXIT_SOFTWARE, ServeError, Service};
pub use version::ApiVersion;
