//! A built service, and serving it: `main`'s whole sequence
//! ([`ServiceBuilder::run`], [`ServiceBuilder::run_with`]), the server and
//! the background tasks beside it, and the shutdown that stops both.

use std::{
    fmt,
    future::{Future, IntoFuture},
    net::SocketAddr,
    pin::Pin,
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::{net::TcpListener, task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

use super::ServiceBuilder;
use crate::{
    audit::Auditor,
    config::{Config, Env},
    health::Health,
    protect::LoadShedLayer,
};

/// Exit code when the service cannot be built (`EX_SOFTWARE`).
pub const EXIT_SOFTWARE: u8 = 70;

/// A background task: started when the service starts serving, told to stop
/// through its token.
pub(super) type TaskFn =
    Box<dyn FnOnce(CancellationToken) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// A built service, ready to serve.
pub struct Service {
    pub(super) name: String,
    pub(super) version: u32,
    /// The package version, from [`BuildInfo`](super::BuildInfo).
    pub(super) package_version: &'static str,
    pub(super) router: Router,
    pub(super) config: Config,
    pub(super) health: Health,
    pub(super) tasks: Vec<(String, TaskFn)>,
    pub(super) shed: LoadShedLayer,
    pub(super) prometheus: PrometheusHandle,
    pub(super) auditor: Auditor,
    pub(super) peer_addresses: bool,
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

impl fmt::Debug for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Service")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

// === impl ServiceBuilder: main ===

impl ServiceBuilder {
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
    ///                     api::get("/greeting", move || async move { greeting }).public().response_as::<String>(200, "text/plain"),
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
            && builder.requires_auth()
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

// === impl Service ===

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
            name,
            version,
            package_version,
            router,
            config,
            health,
            tasks,
            shed,
            prometheus,
            auditor,
            peer_addresses,
        } = self;

        // Spans leave the process from here on, when `OTEL_*` asks for it.
        #[cfg(feature = "otel")]
        let tracing_pipeline = crate::otel::install(
            &config.tracing,
            crate::otel::ResourceInfo {
                service_name: name.clone(),
                service_version: package_version.to_owned(),
                instance_id: crate::otel::instance_id(),
            },
        );
        #[cfg(not(feature = "otel"))]
        let _ = (&name, package_version);

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
        // And send the spans still queued, within what is left of the grace.
        #[cfg(feature = "otel")]
        if let Some(pipeline) = tracing_pipeline {
            let remaining = at
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(500));
            pipeline.shutdown(remaining).await;
        }
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
