//! One service per process, and the demo's own monitor service.

use std::{process::ExitCode, time::Duration};

use chassis::{
    ServiceBuilder,
    config::{Config, ConfigError, EXIT_CONFIG, Env, Reader},
};

use crate::{journey, system::Endpoints};

/// Runs the service `name` in this process until SIGTERM, exactly as its
/// own binary does: settings from the environment (exit 78 listing every
/// problem), then the service's `app`.
pub async fn run(name: &str) -> ExitCode {
    let env = Env::process();
    let mut r = Reader::new(&env);
    let config = Config::read(&mut r);
    let built = match name {
        "auth" => {
            let settings = auth::Settings::read(&mut r);
            // auth binds before it builds, to serve its own key set.
            return match finish(r) {
                Ok(()) => auth::run(config, settings).await,
                Err(code) => code,
            };
        }
        "ticketing" => {
            let settings = ticketing::Settings::read(&mut r);
            match finish(r) {
                Ok(()) => ticketing::app_on(
                    ServiceBuilder::new(ticketing::NAME, 1).config(config),
                    settings,
                )
                .await
                .map_err(|e| e.to_string()),
                Err(code) => return code,
            }
        }
        "mail" => {
            let settings = mail::Settings::read(&mut r);
            match finish(r) {
                Ok(()) => mail::app_on(ServiceBuilder::new(mail::NAME, 1).config(config), settings)
                    .await
                    .map_err(|e| e.to_string()),
                Err(code) => return code,
            }
        }
        "orders" => {
            let settings = orders::Settings::read(&mut r);
            match finish(r) {
                Ok(()) => orders::app_on(
                    ServiceBuilder::new(orders::NAME, orders::API_VERSION).config(config),
                    settings,
                )
                .await
                .map_err(|e| e.to_string()),
                Err(code) => return code,
            }
        }
        other => {
            eprintln!("demo: no service called {other:?}");
            return ExitCode::from(64);
        }
    };
    match built {
        // The builder carries the configuration: message consumers share
        // the verifier it makes for the API.
        Ok(service) => service.run().await,
        Err(e) => {
            eprintln!("{name} cannot start: {e}");
            ExitCode::FAILURE
        }
    }
}

fn finish(r: Reader<'_>) -> Result<(), ExitCode> {
    r.finish().map_err(|e: ConfigError| {
        eprintln!("{e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

/// The demo's own service on `port`: `/metrics` with the synthetic
/// monitor's results, which runs the journey every `every`, until SIGTERM or
/// Ctrl-C.
pub async fn monitor(endpoints: Endpoints, port: u16, every: Duration) -> ExitCode {
    let mut config = Config::default();
    config.bind = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    config.log = "warn".to_owned();
    config.shutdown_grace = Duration::from_secs(5);
    ServiceBuilder::new("demo", 1)
        .background("synthetic-monitor", move |stop| async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(every) => {}
                }
                let start = tokio::time::Instant::now();
                let outcome = match journey::run(&endpoints).await {
                    Ok(_) => "success",
                    Err(e) => {
                        tracing::warn!(error = %e, "synthetic journey failed");
                        "failure"
                    }
                };
                metrics::counter!("synthetic_journey_runs_total", "outcome" => outcome)
                    .increment(1);
                metrics::histogram!("synthetic_journey_duration_seconds")
                    .record(start.elapsed().as_secs_f64());
            }
        })
        .config(config)
        .run()
        .await
}
