//! [`ServiceBuilder`]: what a service is made of, checked and composed into
//! a [`Service`] by [`build`](ServiceBuilder::build).

use std::{fmt, future::Future, sync::Arc, time::SystemTime};

use axum::{
    Router,
    response::IntoResponse,
    routing::{MethodRouter, get},
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    BuildInfo, Service,
    endpoints::{
        Info, Readiness, health_permission, info_endpoint, metrics_endpoint, not_found,
        not_found_under, openapi_endpoint, ready_endpoint,
    },
    run::TaskFn,
    stack::{self, ApiLayer, FrontLayer, ProtectLayer},
    version::{self, ApiVersion},
};
use crate::{
    api::{Api, DocDeprecation, OPENAPI_PATH},
    audit::{AuditSink, Auditor, LogSink},
    auth::Verifier,
    config::{Config, Env},
    health::{Check, CheckOptions, Health},
    metrics::HttpMetrics,
    protect::LoadShedLayer,
};

type MakeAuditor = Box<dyn FnOnce(&str, usize) -> Auditor + Send>;

/// Builds a [`Service`]; see the [module docs](super).
#[must_use]
pub struct ServiceBuilder {
    // `run_with` (in `run.rs`) reads the name, the configuration, the
    // verifier and the API before it builds.
    pub(super) name: String,
    version: u32,
    pub(super) api: Api,
    /// The other versions served beside `version`, as given.
    versions: Vec<(ApiVersion, Api)>,
    api_layers: Vec<ApiLayer>,
    outer_layers: Vec<ApiLayer>,
    health: Health,
    tasks: Vec<(String, TaskFn)>,
    pub(super) config: Option<Config>,
    build_info: Option<BuildInfo>,
    pub(super) verifier: Option<Verifier>,
    audit_sink: Option<MakeAuditor>,
    auditor: Option<Auditor>,
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

impl ServiceBuilder {
    /// A service called `name` serving API version `version`.
    pub fn new(name: &str, version: u32) -> Self {
        crate::metrics::set_service_label(name);
        Self {
            name: name.to_owned(),
            version,
            api: Api::new(),
            versions: Vec::new(),
            api_layers: Vec::new(),
            outer_layers: Vec::new(),
            health: Health::new(),
            tasks: Vec::new(),
            config: None,
            build_info: None,
            verifier: None,
            audit_sink: None,
            auditor: None,
            peer_addresses: false,
        }
    }

    /// Adds API routes to the current version (the one [`new`](Self::new)
    /// names), mounted under `/<name>/v<version>`. Every route
    /// declares its access (see [`crate::api`]). Handlers that take
    /// [`State<S>`](axum::extract::State) get it from
    /// [`Api::with_state`](crate::api::Api::with_state), called before this.
    pub fn api(mut self, api: Api) -> Self {
        self.api = self.api.merge(api);
        self
    }

    /// Serves another version of the API beside the current one, under
    /// `/<name>/v<N>`, with its own routes, permissions and OpenAPI document
    /// (`/<name>/v<N>/openapi.json`): typically the previous version, kept
    /// for the clients that have not moved yet, deprecated with a sunset
    /// (see the [module docs](super#api-versions)). A bare number is a
    /// version that is not deprecated. Each version is given once; the
    /// current one's routes are added with [`api`](Self::api).
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use chassis::{ServiceBuilder, api::{self, Api}, service::ApiVersion};
    ///
    /// let route = || api::get("/status", || async { "open" }).public().response_as::<String>(200, "text/plain");
    /// let since = SystemTime::now();
    /// let service = ServiceBuilder::new("shop", 2)
    ///     .api(Api::new().route(route()))
    ///     .version(
    ///         ApiVersion::new(1).deprecated(since).sunset(since + Duration::from_secs(180 * 86_400)),
    ///         Api::new().route(route()),
    ///     )
    ///     .config(chassis::Config::default())
    ///     .build()
    ///     .unwrap();
    /// # let _ = service;
    /// ```
    pub fn version(mut self, version: impl Into<ApiVersion>, api: Api) -> Self {
        self.versions.push((version.into(), api));
        self
    }

    /// Whether a route of any version requires a permission (and so a token
    /// verifier).
    #[cfg(feature = "jwt")]
    pub(super) fn requires_auth(&self) -> bool {
        self.api.requires_auth() || self.versions.iter().any(|(_, api)| api.requires_auth())
    }

    /// Verifies tokens with `verifier` instead of one built from
    /// `CHASSIS_AUTH_*`.
    #[cfg(feature = "jwt")]
    #[cfg_attr(docsrs, doc(cfg(feature = "jwt")))]
    pub fn verifier(mut self, verifier: Verifier) -> Self {
        self.verifier = Some(verifier);
        self
    }

    /// The verifier of the service's tokens, for what else verifies them
    /// besides the API (a [message consumer](crate::messaging::Consumer)),
    /// so that both share one verifier and one key cache: the one given
    /// with [`verifier`](Self::verifier), or one built now from the
    /// `CHASSIS_AUTH_*` settings of the [`config`](Self::config) given, and
    /// kept for the API. `Ok(None)` when neither was given.
    ///
    /// ```
    /// # #[cfg(feature = "testing")] {
    /// use chassis::{ServiceBuilder, testing::TestIssuer};
    ///
    /// let issuer = TestIssuer::new();
    /// let mut builder = ServiceBuilder::new("mail", 1).verifier(issuer.verifier());
    /// let shared = builder.shared_verifier().unwrap();
    /// assert!(shared.is_some());
    /// assert!(ServiceBuilder::new("mail", 1).shared_verifier().unwrap().is_none());
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// When the configuration's settings cannot make a verifier.
    #[cfg(feature = "jwt")]
    #[cfg_attr(docsrs, doc(cfg(feature = "jwt")))]
    pub fn shared_verifier(&mut self) -> Result<Option<Verifier>, crate::auth::VerifierError> {
        if self.verifier.is_none()
            && let Some(auth) = self.config.as_ref().and_then(|c| c.auth.as_ref())
        {
            self.verifier = Some(auth.verifier()?);
        }
        Ok(self.verifier.clone())
    }

    /// The service's [`Auditor`], made now, for what the service audits
    /// outside its API (a message consumer's decisions): the same one the
    /// API's calls are audited by once built, writing to the
    /// [`audit_sink`](Self::audit_sink), else `CHASSIS_AUDIT_FILE` of the
    /// [`config`](Self::config), else the log. Call it after those two.
    ///
    /// ```
    /// use chassis::ServiceBuilder;
    ///
    /// let mut builder = ServiceBuilder::new("mail", 1);
    /// let auditor = builder.shared_auditor().unwrap();
    /// assert_eq!(&**auditor.service(), "mail");
    /// ```
    ///
    /// # Errors
    ///
    /// When `CHASSIS_AUDIT_FILE` cannot be opened: the message says which
    /// file and why.
    pub fn shared_auditor(&mut self) -> Result<Auditor, String> {
        if let Some(auditor) = &self.auditor {
            return Ok(auditor.clone());
        }
        let (file, queue) = match &self.config {
            Some(c) => (c.audit_file.clone(), c.audit_queue),
            None => (None, crate::audit::DEFAULT_QUEUE),
        };
        let auditor = match (self.audit_sink.take(), file) {
            (Some(make), _) => make(&self.name, queue),
            (None, Some(path)) => {
                let sink = crate::audit::FileSink::open(&path).map_err(|e| {
                    format!("CHASSIS_AUDIT_FILE: cannot open {}: {e}", path.display())
                })?;
                Auditor::new(&self.name, sink, queue)
            }
            (None, None) => Auditor::new(&self.name, LogSink, queue),
        };
        self.auditor = Some(auditor.clone());
        Ok(auditor)
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
    ///     .api(Api::new().route(api::get("/items", || async { "[]" }).public().response::<Vec<String>>(200)))
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
    /// Every problem at once: an invalid name, a version of 0, a version
    /// given twice, a sunset without a deprecation or before it, an API route
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
        let mut versions = vec![(ApiVersion::new(self.version), self.api)];
        versions.extend(self.versions);
        let (versions, version_problems) = version::resolve(&self.name, versions);
        problems.extend(version_problems);
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
        let mut apis = Vec::new();
        for (served, api) in versions {
            match api.build(&served.prefix, verifier.as_ref()) {
                Ok((paths, document)) => apis.push((served, paths, document)),
                Err(e) => problems.extend(e),
            }
        }
        let auditor = match (self.auditor, self.audit_sink, &config.audit_file) {
            (Some(shared), ..) => Some(shared),
            (None, Some(make), _) => Some(make(&self.name, config.audit_queue)),
            (None, None, Some(path)) => match crate::audit::FileSink::open(path) {
                Ok(sink) => Some(Auditor::new(&self.name, sink, config.audit_queue)),
                Err(e) => {
                    problems.push(format!(
                        "CHASSIS_AUDIT_FILE: cannot open {}: {e}",
                        path.display()
                    ));
                    None
                }
            },
            (None, None, None) => None,
        };
        if !problems.is_empty() {
            return Err(BuildError { problems });
        }

        let prometheus = crate::metrics::install_recorder();
        let metrics = HttpMetrics::new(self.name.clone());
        let shed = LoadShedLayer::new(config.max_concurrent_requests);
        let auditor =
            auditor.unwrap_or_else(|| Auditor::new(&self.name, LogSink, config.audit_queue));
        let build = self.build_info.unwrap_or_default();
        let package_version = build.version;
        let info = Arc::new(Info {
            service: self.name.clone(),
            api_version: self.version,
            versions: apis.iter().map(|(served, ..)| served.info()).collect(),
            build,
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

        let mut standard = Router::new()
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
            .route("/info", get(info_endpoint).with_state(info));
        // The standard routes of each version, under its prefix; those of a
        // deprecated version carry its headers too (not counted: they are
        // read by tools, not called by clients).
        let mut mounted = Vec::new();
        let mut deprecated = Vec::new();
        for (served, paths, document) in apis {
            let v = &served.version;
            if let Some(sunset) = v.sunset_at().filter(|t| *t < SystemTime::now()) {
                tracing::warn!(
                    api_version = v.number(),
                    sunset = %crate::time::rfc3339_millis(crate::time::unix_millis(sunset)),
                    "this API version is past its sunset and still served"
                );
            }
            let doc_deprecation = v.deprecated_at().map(|since| DocDeprecation {
                since,
                sunset: v.sunset_at(),
                successor: served
                    .successor
                    .map(|n| format!("/{}/v{n}{OPENAPI_PATH}", self.name)),
            });
            // Built once; every request for it is a clone of the bytes.
            let document = document.render(
                &self.name,
                v.number(),
                package_version,
                doc_deprecation.as_ref(),
            );
            let mut routes = Router::new().route(
                &format!("{}{OPENAPI_PATH}", served.prefix),
                get(openapi_endpoint).with_state(document),
            );
            // The page that renders the document, beside it (public, not
            // audited).
            #[cfg(feature = "docs-ui")]
            {
                routes = routes.merge(crate::api::docs_ui::router(
                    &served.prefix,
                    OPENAPI_PATH.trim_start_matches('/'),
                ));
            }
            if let Some(notice) = served.notice_layer() {
                routes = routes.layer(notice);
            }
            if let Some(layer) = served.layer(&self.name, crate::metrics::UNMATCHED) {
                deprecated.push((served.prefix.clone(), layer));
            }
            standard = standard.merge(routes);
            mounted.push((served, paths));
        }
        // A path under a deprecated version's prefix that matches nothing
        // is answered with its headers; without one, the plain 404.
        let standard = if deprecated.is_empty() {
            standard.fallback(not_found)
        } else {
            let deprecated = Arc::new(deprecated);
            standard.fallback(move |uri: http::Uri| not_found_under(deprecated.clone(), uri))
        };
        let router = stack::mount(
            mounted,
            standard,
            &stack::Layers {
                front: FrontLayer { metrics },
                protect: ProtectLayer {
                    auditor: auditor.clone(),
                    api_version: None,
                    shed: shed.clone(),
                    max_body: config.max_body_bytes,
                    timeout: config.request_timeout,
                },
                fault: config.fault.clone().map(crate::fault::FaultLayer::new),
                outer: &self.outer_layers,
                around_handlers: &self.api_layers,
            },
        );

        Ok(Service {
            name: self.name,
            version: self.version,
            package_version,
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
}

fn valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    name.len() <= 63
        && bytes.next().is_some_and(|b| b.is_ascii_lowercase())
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
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
