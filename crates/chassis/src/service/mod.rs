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
//!         .api(Api::new().route(api::get("/greetings/{name}", greet).public()))
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
//!     .api(Api::new().route(api::get("/greetings", || async { "hello" }).public()))
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
//! [`BodyLimitLayer`]: crate::protect::BodyLimitLayer
//! [`RequestTimeoutLayer`]: crate::protect::RequestTimeoutLayer

use std::{
    fmt,
    future::{Future, IntoFuture},
    net::SocketAddr,
    pin::Pin,
    process::ExitCode,
    sync::Arc,
    time::{Duration, SystemTime},
};

use axum::{
    Router,
    extract::DefaultBodyLimit,
    response::IntoResponse,
    routing::{MethodRouter, get},
};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::{net::TcpListener, task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder as Stack;

mod endpoints;
mod stack;

pub use endpoints::health_permission;
use endpoints::{Info, Readiness, info_endpoint, metrics_endpoint, not_found, ready_endpoint};
use stack::{FrontLayer, ProtectLayer};

use crate::{
    api::Api,
    audit::{AuditSink, Auditor, LogSink},
    auth::Verifier,
    config::{Config, Env},
    health::{Check, CheckOptions, Health},
    metrics::HttpMetrics,
    protect::LoadShedLayer,
};

/// Exit code when the service cannot be built (`EX_SOFTWARE`).
pub const EXIT_SOFTWARE: u8 = 70;

/// What a service reports at `/info` about its build.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BuildInfo {
    /// The package name.
    pub package: &'static str,
    /// The package version.
    pub version: &'static str,
    /// The git commit, when the build set `CHASSIS_BUILD_GIT_SHA`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub git_sha: Option<&'static str>,
    /// When it was built, when the build set `CHASSIS_BUILD_TIME`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build_time: Option<&'static str>,
}

/// The [`BuildInfo`] of the crate that calls it: its package name and version
/// and, when set at compile time, `CHASSIS_BUILD_GIT_SHA` and
/// `CHASSIS_BUILD_TIME`.
#[macro_export]
macro_rules! build_info {
    () => {
        $crate::service::BuildInfo {
            package: env!("CARGO_PKG_NAME"),
            version: env!("CARGO_PKG_VERSION"),
            git_sha: option_env!("CHASSIS_BUILD_GIT_SHA"),
            build_time: option_env!("CHASSIS_BUILD_TIME"),
        }
    };
}

type ApiLayer = Box<dyn Fn(MethodRouter) -> MethodRouter + Send>;
type MakeAuditor = Box<dyn FnOnce(&str, usize) -> Auditor + Send>;
type TaskFn = Box<dyn FnOnce(CancellationToken) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// Builds a [`Service`]; see the [module docs](self).
#[must_use]
pub struct ServiceBuilder {
    name: String,
    version: u32,
    api: Api,
    api_layers: Vec<ApiLayer>,
    outer_layers: Vec<ApiLayer>,
    health: Health,
    tasks: Vec<(String, TaskFn)>,
    config: Option<Config>,
    build_info: Option<BuildInfo>,
    verifier: Option<Verifier>,
    audit_sink: Option<MakeAuditor>,
    peer_addresses: bool,
}

impl fmt::Debug for ServiceBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceBuilder")
            .field("name", &self.name)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// Why a service could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot build the service:{}", .problems.iter().map(|p| format!("\n  - {p}")).collect::<String>())]
pub struct BuildError {
    problems: Vec<String>,
}

impl BuildError {
    /// Every problem found.
    pub fn problems(&self) -> &[String] {
        &self.problems
    }
}

/// Why a service stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The server failed.
    #[error("server error: {0}")]
    Io(#[from] std::io::Error),
}

impl ServiceBuilder {
    /// A service called `name` serving API version `version`.
    pub fn new(name: &str, version: u32) -> Self {
        crate::metrics::set_service_label(name);
        Self {
            name: name.to_owned(),
            version,
            api: Api::new(),
            api_layers: Vec::new(),
            outer_layers: Vec::new(),
            health: Health::new(),
            tasks: Vec::new(),
            config: None,
            build_info: None,
            verifier: None,
            audit_sink: None,
            peer_addresses: false,
        }
    }

    /// Adds API routes, mounted under `/<name>/v<version>`. Every route
    /// declares its access (see [`crate::api`]). Handlers that take
    /// [`State<S>`](axum::extract::State) get it from
    /// [`Api::with_state`](crate::api::Api::with_state), called before this.
    pub fn api(mut self, api: Api) -> Self {
        self.api = self.api.merge(api);
        self
    }

    /// Verifies tokens with `verifier` instead of one built from
    /// `CHASSIS_AUTH_*`.
    #[cfg(feature = "jwt")]
    #[cfg_attr(docsrs, doc(cfg(feature = "jwt")))]
    pub fn verifier(mut self, verifier: Verifier) -> Self {
        self.verifier = Some(verifier);
        self
    }

    /// Sends audit events to `sink` instead of the log (or
    /// `CHASSIS_AUDIT_FILE`).
    pub fn audit_sink(mut self, sink: impl AuditSink) -> Self {
        self.audit_sink = Some(Box::new(move |name: &str, queue: usize| {
            Auditor::new(name, sink, queue)
        }));
        self
    }

    /// Gives each request the TCP peer's address, for handlers to extract
    /// as `ConnectInfo<SocketAddr>` (e.g. throttling by client address).
    /// Behind a proxy or load balancer it is the proxy's address. Off by
    /// default: it costs an extension per request, and most services have
    /// no use for it.
    pub fn peer_addresses(mut self) -> Self {
        self.peer_addresses = true;
        self
    }

    /// Adds a layer around the handlers of every API route, inside all of
    /// the chassis' layers: it runs for authorized calls only, sees the
    /// caller's [`Principal`](crate::auth::Principal) and the correlation
    /// id, and a panic in it is caught like one in a handler. Layers added
    /// first are outermost.
    pub fn api_layer<L>(mut self, layer: L) -> Self
    where
        L: tower::Layer<axum::routing::Route> + Clone + Send + Sync + 'static,
        L::Service: tower::Service<axum::extract::Request, Error = std::convert::Infallible>
            + Clone
            + Send
            + Sync
            + 'static,
        <L::Service as tower::Service<axum::extract::Request>>::Response: IntoResponse + 'static,
        <L::Service as tower::Service<axum::extract::Request>>::Future: Send + 'static,
    {
        self.api_layers
            .push(Box::new(move |r: MethodRouter| r.layer(layer.clone())));
        self
    }

    /// Adds a layer around every API route **outside** the guard, the audit
    /// and the protection layers, and inside correlation, problem and
    /// observation: the place for a service's own HTTP policy, such as
    /// tower-http's `CorsLayer` (a CORS preflight is answered before
    /// authentication, so a browser can ask before it sends a token) or
    /// `CompressionLayer`. Its responses carry the correlation id and are
    /// counted and logged like any other; what it answers itself is neither
    /// authenticated nor audited, so it must grant nothing. Layers added
    /// first are outermost. With none, the API's stack is one level, as
    /// always; with some, one more level per route.
    ///
    /// ```
    /// use chassis::{ServiceBuilder, api::{self, Api}};
    ///
    /// // A layer of the service's own (tower-http's CorsLayer fits here).
    /// let stamp = axum::middleware::map_response(|mut res: axum::response::Response| async move {
    ///     res.headers_mut().insert("x-edge", http::HeaderValue::from_static("1"));
    ///     res
    /// });
    /// let service = ServiceBuilder::new("shop", 1)
    ///     .api(Api::new().route(api::get("/items", || async { "[]" }).public()))
    ///     .outer_layer(stamp)
    ///     .config(chassis::Config::default())
    ///     .build()
    ///     .unwrap();
    /// # let _ = service;
    /// ```
    pub fn outer_layer<L>(mut self, layer: L) -> Self
    where
        L: tower::Layer<axum::routing::Route> + Clone + Send + Sync + 'static,
        L::Service: tower::Service<axum::extract::Request, Error = std::convert::Infallible>
            + Clone
            + Send
            + Sync
            + 'static,
        <L::Service as tower::Service<axum::extract::Request>>::Response: IntoResponse + 'static,
        <L::Service as tower::Service<axum::extract::Request>>::Future: Send + 'static,
    {
        self.outer_layers
            .push(Box::new(move |r: MethodRouter| r.layer(layer.clone())));
        self
    }

    /// Registers a readiness check.
    pub fn health_check(self, name: &str, check: impl Check, options: CheckOptions) -> Self {
        self.health.register(name, check, options);
        self
    }

    /// Adds a background task. It starts when the service starts serving and
    /// gets a token that is cancelled on shutdown; the service waits for it
    /// (within the grace period) before exiting.
    pub fn background<F, Fut>(mut self, name: &str, task: F) -> Self
    where
        F: FnOnce(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.tasks
            .push((name.to_owned(), Box::new(move |t| Box::pin(task(t)))));
        self
    }

    /// Uses `config` instead of reading `CHASSIS_*` from the environment.
    pub fn config(mut self, config: Config) -> Self {
        self.config = Some(config);
        self
    }

    /// What `/info` reports about the build; use [`build_info!`](crate::build_info).
    pub fn build_info(mut self, info: BuildInfo) -> Self {
        self.build_info = Some(info);
        self
    }

    /// Builds the service: validates it, installs the metrics recorder and
    /// composes the layers.
    ///
    /// # Errors
    ///
    /// Every problem at once: an invalid name, a version of 0, an API route
    /// that declares no access or an invalid one, a route that requires a
    /// permission when no token verifier is configured (in a build without
    /// the `jwt` feature, always: the message then names the feature), or
    /// (when no [`config`](Self::config) was given) invalid `CHASSIS_*`
    /// settings.
    pub fn build(self) -> Result<Service, BuildError> {
        let mut problems = Vec::new();
        if !valid_name(&self.name) {
            problems.push(format!(
                "service name `{}` must match [a-z][a-z0-9-]* and be at most 63 characters",
                self.name.escape_default()
            ));
        }
        if self.version == 0 {
            problems.push("API version must be at least 1".to_owned());
        }
        let config = match self.config {
            Some(c) => c,
            None => Config::from_env(&Env::process()).unwrap_or_else(|e| {
                problems.extend(e.problems().iter().map(ToString::to_string));
                Config::default()
            }),
        };
        #[cfg(feature = "jwt")]
        let verifier = match (self.verifier, &config.auth) {
            (Some(v), _) => Some(v),
            (None, Some(auth)) => match auth.verifier() {
                Ok(v) => Some(v),
                Err(e) => {
                    problems.extend(e.0);
                    None
                }
            },
            (None, None) => None,
        };
        // Without `jwt` nothing verifies tokens: the API's build below
        // refuses a route that requires a permission, naming the feature.
        #[cfg(not(feature = "jwt"))]
        let verifier = self.verifier;
        let prefix = format!("/{}/v{}", self.name, self.version);
        let api = match self.api.build(&prefix, verifier.as_ref()) {
            Ok(api) => Some(api),
            Err(e) => {
                problems.extend(e);
                None
            }
        };
        let auditor = match (self.audit_sink, &config.audit_file) {
            (Some(make), _) => Some(make(&self.name, config.audit_queue)),
            (None, Some(path)) => match crate::audit::FileSink::open(path) {
                Ok(sink) => Some(Auditor::new(&self.name, sink, config.audit_queue)),
                Err(e) => {
                    problems.push(format!(
                        "CHASSIS_AUDIT_FILE: cannot open {}: {e}",
                        path.display()
                    ));
                    None
                }
            },
            (None, None) => None,
        };
        let (Some(api), true) = (api, problems.is_empty()) else {
            return Err(BuildError { problems });
        };

        let prometheus = crate::metrics::install_recorder();
        let metrics = HttpMetrics::new(self.name.clone());
        let shed = LoadShedLayer::new(config.max_concurrent_requests);
        let auditor =
            auditor.unwrap_or_else(|| Auditor::new(&self.name, LogSink, config.audit_queue));
        let info = Arc::new(Info {
            service: self.name.clone(),
            api_version: self.version,
            build: self.build_info.unwrap_or_default(),
            started: SystemTime::now(),
            started_mono: Instant::now(),
        });
        #[cfg(feature = "jwt")]
        let tasks = {
            let mut tasks = self.tasks;
            if let Some(v) = &verifier {
                for (name, check, options) in v.health_checks() {
                    self.health.register(name, check, options);
                }
                for task in v.refresh_tasks() {
                    tasks.push(("jwks-refresh".to_owned(), Box::new(task)));
                }
            }
            tasks
        };
        #[cfg(not(feature = "jwt"))]
        let tasks = self.tasks;

        // Every layer level axum adds boxes the route again, which costs a
        // clone and an allocation per request; so each API path gets all of
        // its layers as one level, and the other routes the first three.
        let front = FrontLayer { metrics };
        let protect = ProtectLayer {
            auditor: auditor.clone(),
            shed: shed.clone(),
            max_body: config.max_body_bytes,
            timeout: config.request_timeout,
        };
        // axum's extractors have a limit of their own, 2 MiB by default; it
        // is raised only when ours is higher, since setting it costs an
        // extension insert on every request.
        let extractor_limit = (config.max_body_bytes > AXUM_DEFAULT_BODY_LIMIT)
            .then(|| DefaultBodyLimit::max(config.max_body_bytes));
        let fault = config.fault.clone().map(crate::fault::FaultLayer::new);
        let mut router = Router::new();
        // The optional layers are chosen here, once, rather than per request
        // through `option_layer`, whose `Either` moves every request again.
        macro_rules! mount {
            ($optional:expr) => {{
                let optional = $optional;
                for path in api {
                    let inner = Stack::new()
                        .layer(protect.clone())
                        .layer(optional.clone())
                        .layer(path.guard_layer());
                    let mut handlers = path.router;
                    for layer in self.api_layers.iter().rev() {
                        handlers = layer(handlers);
                    }
                    let handlers = if self.outer_layers.is_empty() {
                        handlers.layer(Stack::new().layer(front.clone()).layer(inner))
                    } else {
                        // The service's outer layers sit between the front
                        // and the rest: one more level per route.
                        let mut guarded = handlers.layer(inner);
                        for layer in self.outer_layers.iter().rev() {
                            guarded = layer(guarded);
                        }
                        guarded.layer(front.clone())
                    };
                    router = router.route(&path.path, handlers);
                }
            }};
        }
        match (extractor_limit, fault) {
            (None, None) => mount!(tower::layer::util::Identity::new()),
            (Some(limit), None) => mount!(limit),
            (None, Some(fault)) => mount!(fault),
            (Some(limit), Some(fault)) => mount!(Stack::new().layer(limit).layer(fault)),
        }
        let standard = Router::new()
            .route("/health/live", get(crate::health::live))
            .route(
                "/health/ready",
                get(ready_endpoint).with_state(Arc::new(Readiness {
                    health: self.health.clone(),
                    verifier: verifier.clone(),
                    permission: health_permission(&self.name),
                })),
            )
            .route(
                "/metrics",
                get(metrics_endpoint).with_state(prometheus.clone()),
            )
            .route("/info", get(info_endpoint).with_state(info))
            .fallback(not_found)
            .layer(front);
        let router = router.merge(standard);

        Ok(Service {
            name: self.name,
            version: self.version,
            router,
            config,
            health: self.health,
            tasks,
            shed,
            prometheus,
            auditor,
            peer_addresses: self.peer_addresses,
        })
    }

    /// Everything `main` needs: reads `CHASSIS_*` (exit 78 listing every
    /// problem, or when routes require permissions and `CHASSIS_AUTH_*` is
    /// not set), sets up logging, builds (exit 70 on a programming error,
    /// such as a route that requires a permission in a build without the
    /// `jwt` feature), binds `CHASSIS_BIND` and serves until SIGTERM or
    /// SIGINT (exit 0). [`run_with`](Self::run_with) with no settings of the
    /// service's own and nothing to set up.
    pub async fn run(self) -> ExitCode {
        self.run_with(
            |_, _| (),
            |builder, (), _| async move { Ok::<_, std::convert::Infallible>(builder) },
        )
        .await
    }

    /// `main` for a service with settings and start-up work of its own, in
    /// this order:
    ///
    /// 1. `read` reads the service's settings with the same
    ///    [`Reader`](crate::config::Reader) as `CHASSIS_*` (it also sees
    ///    the chassis' [`Config`]), so every problem of both is listed at
    ///    once (exit 78);
    /// 2. logging starts, so nothing `app` logs is lost;
    /// 3. `CHASSIS_BIND` is bound, so `app` knows the service's address
    ///    (with port 0, the one the system chose);
    /// 4. `app` gets this builder, the settings and the address, and returns
    ///    the builder with its API, checks and tasks (opening a database,
    ///    say); an error is logged and exits 1;
    /// 5. the service is built and serves as [`run`](Self::run) does.
    ///
    /// ```no_run
    /// use chassis::{ServiceBuilder, api::{self, Api}, config::Reader};
    ///
    /// struct Settings { greeting: String }
    ///
    /// #[tokio::main]
    /// async fn main() -> std::process::ExitCode {
    ///     ServiceBuilder::new("hello", 1)
    ///         .run_with(
    ///             |r: &mut Reader<'_>, _| Settings {
    ///                 greeting: r.optional("HELLO_GREETING", "hello".to_owned(), "the greeting"),
    ///             },
    ///             |builder, settings, address| async move {
    ///                 tracing::info!(%address, "setting up");
    ///                 let greeting = settings.greeting;
    ///                 Ok::<_, std::io::Error>(builder.api(Api::new().route(
    ///                     api::get("/greeting", move || async move { greeting }).public(),
    ///                 )))
    ///             },
    ///         )
    ///         .await
    /// }
    /// ```
    pub async fn run_with<S, F, Fut, E>(
        mut self,
        read: impl FnOnce(&mut crate::config::Reader<'_>, &Config) -> S,
        app: F,
    ) -> ExitCode
    where
        F: FnOnce(ServiceBuilder, S, SocketAddr) -> Fut,
        Fut: Future<Output = Result<ServiceBuilder, E>>,
        E: fmt::Display,
    {
        let env = Env::process();
        let mut reader = crate::config::Reader::new(&env);
        let config = match self.config.take() {
            Some(c) => c,
            None => Config::read(&mut reader),
        };
        let settings = read(&mut reader, &config);
        if let Err(e) = reader.finish() {
            eprintln!("{e}");
            return ExitCode::from(crate::config::EXIT_CONFIG);
        }
        let _telemetry = crate::telemetry::init(&self.name, &config);
        // Checked when the configuration was read; every outbound connection
        // built from here on trusts these roots.
        #[cfg(feature = "tls")]
        if let Ok(tls) = crate::tls::ClientTls::from_ca_file(config.tls_ca_file.as_deref()) {
            tls.install_global();
        }
        let listener = match TcpListener::bind(config.bind).await {
            Ok(l) => l,
            Err(source) => {
                return stopped(&ServeError::Bind {
                    addr: config.bind,
                    source,
                });
            }
        };
        let address = match listener.local_addr() {
            Ok(a) => a,
            Err(e) => return stopped(&ServeError::Io(e)),
        };
        let name = self.name.clone();
        let builder = match app(self.config(config), settings, address).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                eprintln!("{name} cannot start: {e}");
                return ExitCode::FAILURE;
            }
        };
        #[cfg(feature = "jwt")]
        if builder.config.as_ref().is_some_and(|c| c.auth.is_none())
            && builder.verifier.is_none()
            && builder.api.requires_auth()
        {
            // A deployment problem, not a programming one: say which setting.
            let e = crate::config::ConfigError::new(vec![crate::config::ConfigProblem {
                name: "CHASSIS_AUTH_ISSUER".to_owned(),
                message: "required: the API has routes that require a permission, so tokens must be verified (set CHASSIS_AUTH_ISSUER and CHASSIS_AUTH_AUDIENCE; the keys are discovered from the issuer unless CHASSIS_AUTH_JWKS_URL is set)".to_owned(),
            }]);
            tracing::error!(error = %e, "cannot start");
            eprintln!("{e}");
            return ExitCode::from(crate::config::EXIT_CONFIG);
        }
        let service = match builder.build() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot build the service");
                eprintln!("{e}");
                return ExitCode::from(EXIT_SOFTWARE);
            }
        };
        match service
            .serve_with(listener, crate::shutdown::signal())
            .await
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => stopped(&e),
        }
    }
}

/// Logs why the service stopped, and exits 1.
fn stopped(e: &ServeError) -> ExitCode {
    tracing::error!(error = %e, "service stopped");
    eprintln!("{e}");
    ExitCode::FAILURE
}

/// The body limit axum's extractors apply unless told otherwise.
const AXUM_DEFAULT_BODY_LIMIT: usize = 2 * 1024 * 1024;

fn valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    name.len() <= 63
        && bytes.next().is_some_and(|b| b.is_ascii_lowercase())
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A built service, ready to serve.
pub struct Service {
    name: String,
    version: u32,
    router: Router,
    config: Config,
    health: Health,
    tasks: Vec<(String, TaskFn)>,
    shed: LoadShedLayer,
    prometheus: PrometheusHandle,
    auditor: Auditor,
    peer_addresses: bool,
}

impl fmt::Debug for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Service")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Service {
    /// The complete application with every layer, e.g. to drive with
    /// `tower::ServiceExt::oneshot` in tests.
    pub fn router(&self) -> Router {
        self.router.clone()
    }

    /// The readiness state.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// The configuration in use.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The audit queue.
    pub fn auditor(&self) -> &Auditor {
        &self.auditor
    }

    /// The handle that renders `/metrics`.
    pub fn prometheus(&self) -> &PrometheusHandle {
        &self.prometheus
    }

    /// Binds `CHASSIS_BIND` and serves until SIGTERM or SIGINT.
    ///
    /// # Errors
    ///
    /// If the address cannot be bound, or the server fails.
    pub async fn serve(self) -> Result<(), ServeError> {
        let addr = self.config.bind;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { addr, source })?;
        self.serve_with(listener, crate::shutdown::signal()).await
    }

    /// Serves on `listener` until `shutdown` completes, then shuts down as the
    /// [`shutdown`](crate::shutdown) module describes.
    ///
    /// # Errors
    ///
    /// If the server fails.
    pub async fn serve_with(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let local = listener.local_addr()?;
        let Self {
            name: _,
            version,
            router,
            config,
            health,
            tasks,
            shed,
            prometheus,
            auditor,
            peer_addresses,
        } = self;

        let stop_tasks = CancellationToken::new();
        let mut handles: Vec<(String, JoinHandle<()>)> = health
            .spawn(&stop_tasks)
            .into_iter()
            .map(|h| ("health-check".to_owned(), h))
            .collect();
        handles.push((
            "metrics-upkeep".to_owned(),
            tokio::spawn(upkeep(prometheus, stop_tasks.clone())),
        ));
        for (task_name, task) in tasks {
            handles.push((task_name, tokio::spawn(task(stop_tasks.clone()))));
        }

        // The signal flips readiness at once; the listener closes after the delay.
        let draining = CancellationToken::new();
        let deadline = Arc::new(std::sync::Mutex::new(None::<Instant>));
        let close_listener = {
            let (health, draining, deadline, delay, grace) = (
                health.clone(),
                draining.clone(),
                deadline.clone(),
                config.shutdown_delay,
                config.shutdown_grace,
            );
            async move {
                shutdown.await;
                health.set_shutting_down();
                let now = Instant::now();
                *deadline
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some(now + grace.max(delay));
                tracing::info!(
                    delay_secs = delay.as_secs(),
                    grace_secs = grace.as_secs(),
                    "shutting down: readiness is down"
                );
                draining.cancel();
                tokio::time::sleep(delay).await;
                tracing::info!("listener closed; draining in-flight requests");
            }
        };

        // The line carries the service already (see `telemetry`).
        tracing::info!(address = %local, api_version = version, "listening");
        let server: std::pin::Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>> =
            if peer_addresses {
                Box::pin(
                    axum::serve(
                        listener,
                        router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
                    )
                    .with_graceful_shutdown(close_listener)
                    .into_future(),
                )
            } else {
                Box::pin(
                    axum::serve(listener, router)
                        .with_graceful_shutdown(close_listener)
                        .into_future(),
                )
            };
        let cut_at_deadline = async {
            draining.cancelled().await;
            let at = deadline
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .unwrap_or_else(Instant::now);
            tokio::time::sleep_until(at).await;
        };
        tokio::select! {
            result = server => result?,
            () = cut_at_deadline => {
                tracing::warn!(
                    requests_cut = shed.in_flight(),
                    "shutdown grace period elapsed; cutting requests still in flight"
                );
            }
        }

        stop_tasks.cancel();
        let at = deadline
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .unwrap_or_else(Instant::now);
        let mut cut = Vec::new();
        for (task_name, mut handle) in handles {
            let remaining = at
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(100));
            if tokio::time::timeout(remaining, &mut handle).await.is_err() {
                handle.abort();
                cut.push(task_name);
            }
        }
        if !cut.is_empty() {
            tracing::warn!(tasks = ?cut, "background tasks cut at the shutdown deadline");
        }
        // Every call has been answered: write out what the audit queue holds.
        let _ = tokio::task::spawn_blocking(move || auditor.flush()).await;
        tracing::info!("stopped");
        Ok(())
    }
}

async fn upkeep(handle: PrometheusHandle, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(crate::metrics::UPKEEP_INTERVAL) => handle.run_upkeep(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        for ok in ["a", "hello", "order-service2", &"a".repeat(63)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            "Hello",
            "1abc",
            "-a",
            "a_b",
            "a.b",
            "a/b",
            "héllo",
            &"a".repeat(64),
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn build_lists_every_problem() {
        let err = ServiceBuilder::new("Bad Name", 0)
            .config(Config::default())
            .build()
            .unwrap_err();
        assert_eq!(err.problems().len(), 2);
        let text = err.to_string();
        assert!(text.contains("`Bad Name`"), "{text}");
        assert!(text.contains("version"), "{text}");
    }
}
