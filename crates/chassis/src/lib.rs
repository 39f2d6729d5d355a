//! `Router` in, production service out: the standards every service meets,
//! as tower layers composed by one builder.
//!
//! # Overview
//!
//! `chassis` turns an axum [`Router`](axum::Router) into a service that is
//! observable, healthy and well-behaved from its first line. This page is the
//! **standards guide**: what every service must do and why. Each module opens
//! with its standard and then shows how the chassis meets it, so a team that
//! uses the [service builder](service) gets all of it by default, and a team
//! that cannot still knows what to build.
//!
//! | standard | every service… | module |
//! |---|---|---|
//! | Shape | serves its API under `/<name>/v<N>` and the standard endpoints at the root | [`service`] |
//! | Configuration | reads typed `CHASSIS_*` / `<SERVICE>_*` variables; on any problem, stops listing them all, exit 78; never prints a secret | [`config`] |
//! | Correlation | accepts or creates an `x-correlation-id`, returns it, logs it, forwards it; continues W3C trace context | [`correlation`] |
//! | Logging | writes one JSON object per line to stdout, with the correlation id; one access-log line per request; no credentials | [`telemetry`] |
//! | Tracing | records a span for every request, every attempt at a call, every storage transaction and every piece of queued work, continues its caller's trace and sampling decision, and exports the spans over OTLP without ever slowing a request | `otel` (feature `otel`) |
//! | Metrics | exports RED metrics by route template and process metrics at `/metrics` | [`metrics`] |
//! | Health | answers liveness without dependencies and readiness from background checks with hysteresis | [`health`] |
//! | Errors | answers every error with `application/problem+json` carrying the correlation id, and no internals | [`problem`] |
//! | Deny by default | declares, next to every API route, the permission it requires or that it is public; undeclared routes stop the build | [`api`] |
//! | Contracts | documents every API route next to its permission (its body, answers and schemas from the Rust types) and serves the OpenAPI 3.1 document at `/<name>/v<N>/openapi.json`, with each operation's permission as `x-permission` and the chassis' own problem+json answers, and a page that renders it at `/<name>/v<N>/docs` from its own assets; undocumented routes stop the build | [`api`], [`api::docs_ui`] (feature `docs-ui`) |
//! | Authentication | verifies a bearer JWT on every non-public call, locally, with keys from the issuer's JWKS | [`auth`] (verification: feature `jwt`) |
//! | Authorization | checks `service:account:operation:object` permissions against the caller's grants; deny wins; no grant, no access | [`permission`] |
//! | Audit | writes exactly one audit event per API call, allowed or not, without ever slowing it | [`audit`] |
//! | Calls to other services | calls each downstream with a per-attempt timeout and a deadline sent as `x-timeout-ms`, safe retries within a budget, a breaker and a bulkhead, its replicas balanced with outlier ejection, its correlation id and trace, and an identity chosen per call | `client` (feature `client`) |
//! | Outbound TLS | verifies every `https://` peer's certificate and host name against the platform's roots and `CHASSIS_TLS_CA_FILE`; offers HTTP/2 | `tls` (feature `tls`) |
//! | Circuit breakers | stops calling a failing downstream, probes it, never wedges | [`circuit_breaker`] |
//! | Bulkheads | bounds the calls in flight to each downstream; refuses fast | [`bulkhead`] |
//! | Retries | retries only idempotent calls, only retryable failures, with jittered backoff, within a budget | [`retry`] |
//! | Failure injection | can slow down or fail a share of calls on purpose, when configured | [`fault`] |
//! | Protection | sheds load fast, limits body size, times requests out, survives panics | [`protect`] |
//! | Messaging | publishes events from its outbox to NATS JetStream with its own token, the correlation id and the trace; consumes them durably, verifying, authorizing and auditing each message as a call, acknowledging after the work commits, dead-lettering what it refuses or gives up, within an in-flight bound, its lag a metric and a readiness check | `messaging` (feature `nats`) |
//! | Storage | owns one database, SQLite on one machine or Postgres for replicas, migrated at start-up, checked for readiness; the same handlers on both | `db` (features `sqlite`, `postgres`) |
//! | Lists | answers every list one page at a time: a stable order, an opaque cursor bound to the list, a bounded `limit`, the next page's link in the body and a `Link` header | [`page`] |
//! | Identifiers | gives records UUIDv7 ids, ordered by creation time, with a prefix naming their kind | [`id`] |
//! | Shutdown | on SIGTERM turns unready, drains, stops background work, exits 0 within a deadline | [`shutdown`] |
//!
//! # Example
//!
//! A complete service. Run it and it listens on `CHASSIS_BIND`
//! (`127.0.0.1:8080`), serving `GET /hello/v1/greetings/{name}` plus
//! `/health/live`, `/health/ready`, `/metrics` and `/info`:
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
//! # Feature flags
//!
//! One feature per optional part, as in tower-http, with "batteries
//! included" defaults: a service gets token verification and the downstream
//! client unless it opts out.
//!
//! | feature | default? | what it adds |
//! |---|---|---|
//! | `process-metrics` | yes | process CPU, memory, file descriptors and start time at `/metrics` |
//! | `jwt` | yes | token verification in [`auth`]: `Verifier`, `AuthConfig` (`CHASSIS_AUTH_*`), key sets and OpenID discovery; enables `tls` (keys are fetched over https); pulls in jsonwebtoken |
//! | `client` | yes | `client`: the downstream client and `TokenSource`; enables `tls` |
//! | `otel` | yes | [`otel`]: distributed tracing, spans exported over OTLP (HTTP/protobuf) to the collector named by `OTEL_EXPORTER_OTLP_ENDPOINT`, configured by the standard `OTEL_*` variables; pulls in the OpenTelemetry SDK and its OTLP exporter (no reqwest, no tonic) |
//! | `tls` | with `jwt` or `client` | `tls`: outbound TLS through rustls on aws-lc-rs, the platform's roots plus `CHASSIS_TLS_CA_FILE` |
//! | `sqlite` | no | `db`: one database per service through sqlx's `Any` driver; SQLite in WAL mode with one writer connection and read-only readers, migrations at start-up, a readiness check |
//! | `postgres` | no | `db` on Postgres as well, chosen by `<PREFIX>_DATABASE_URL` (enables `sqlite`, the embedded default) |
//! | `nats` | no | `messaging`: events over NATS JetStream (`CHASSIS_NATS_*`), a `Publisher` for outbox relays and durable `Consumer`s with the same authentication, permissions, audit, correlation and tracing as API routes, dead letters, lag metrics and readiness; enables `jwt`, `client` and `otel`; pulls in async-nats |
//! | `docs-ui` | yes | [`api::docs_ui`]: the docs page at `/<name>/v<N>/docs`, Swagger UI with every asset in the crate (about 490 KB, gzip-compressed) and served by the service, under a strict Content-Security-Policy; without it the page is not served (404); pulls in flate2 |
//! | `testing` | no | `testing`: a fixed-key token issuer, the verifier that trusts it, a token endpoint, a test PKI, an OTLP collector on loopback (`OtlpReceiver`), and the harness for a service's binary (`ServiceProcess`, `ProcessCheck`, `TempDir`, `eventually`), and with `nats` a NATS server per test (`TestNats`), for tests (dev-dependencies only); enables `jwt`, `tls`, `client` and `otel` |
//! | `contract` | no | `testing::contract`: consumer-driven contracts, a driver client's calls recorded against the real provider (`Recorder`, `Downstream::record_into`) into a committed contract, and a provider's OpenAPI documents checked against every contract naming it; for tests (dev-dependencies only); enables `testing`; pulls in jsonschema |
//!
//! The defaults are `["process-metrics", "jwt", "client", "otel"]`. Everything else
//! is what the service builder needs, so it is always built: the route
//! table and its guard ([`api`]), [`Principal`](auth::Principal),
//! [`AuthError`](auth::AuthError) and the reason codes, [`permission`],
//! [`audit`], health (its [`HttpCheck`](health::HttpCheck) speaks plain
//! HTTP), and the rest of the standards above.
//!
//! A service that verifies no token and calls no other service needs
//! neither jsonwebtoken nor rustls and its aws-lc-sys, the slowest parts of
//! a build:
//!
//! ```toml
//! [dependencies]
//! chassis = { package = "service-chassis", version = "0.1", default-features = false, features = ["process-metrics"] }
//! ```
//!
//! Without `jwt` a service serves public API routes only: a route that
//! `.requires(..)` a permission fails [`ServiceBuilder::build`] (exit 70
//! from [`ServiceBuilder::run`]) with a message naming the `jwt` feature,
//! and a `CHASSIS_AUTH_*` variable set in its environment is a
//! configuration problem naming the feature (exit 78), never a setting
//! silently ignored. `CHASSIS_TLS_CA_FILE` is ignored without `tls`: such a
//! build opens no outbound connection, and platforms often set it for
//! every workload.
//!
//! # Minimum supported Rust version
//!
//! Rust 1.94 (sqlx 0.9, behind the `sqlite` feature, needs it). The policy is rolling, as tower's: the MSRV may rise in a minor
//! release, to a version at least six months old.

#![cfg_attr(docsrs, feature(doc_cfg))]
// The standards guide links the items of every feature; the documented
// build has them all. A build without some documents what it has, and its
// links to the rest stay text.
#![cfg_attr(
    not(all(
        feature = "jwt",
        feature = "client",
        feature = "tls",
        feature = "docs-ui"
    )),
    allow(rustdoc::broken_intra_doc_links, rustdoc::private_intra_doc_links)
)]
#![deny(missing_docs)]
#![warn(clippy::print_stdout)]

#[macro_use]
mod macros;

pub mod api;
pub mod audit;
pub mod auth;
pub mod bulkhead;
pub mod circuit_breaker;
#[cfg(feature = "client")]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub mod client;
pub mod config;
pub mod context;
pub mod correlation;
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub mod db;
mod env;
pub mod fault;
pub mod health;
pub mod id;
mod log_line;
#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub mod messaging;
pub mod metrics;
#[cfg(feature = "otel")]
#[cfg_attr(docsrs, doc(cfg(feature = "otel")))]
pub mod otel;
pub mod page;
pub mod permission;
pub mod problem;
pub mod protect;
pub mod retry;
pub mod service;
pub mod shutdown;
pub mod telemetry;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;
pub mod time;
#[cfg(feature = "tls")]
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
pub mod tls;
pub mod validation;

pub use config::Config;
pub use problem::Problem;
pub use service::{Service, ServiceBuilder};

/// The error type of protocol-agnostic middleware.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
