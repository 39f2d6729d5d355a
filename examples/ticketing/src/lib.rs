//! `ticketing`: ticket products and reservations, per account, never
//! oversold.
//!
//! # What it owns
//!
//! The ticket products of every account (a name, a price in minor units, a
//! capacity, a validity period) and the reservations of places in them, in
//! its own database: a SQLite file (`<TICKETING_DATA_DIR>/ticketing.db`)
//! for one instance, or the Postgres database `TICKETING_DATABASE_URL`
//! names for several, with the same handlers ([`chassis::db`]). No other
//! service opens it: they call this API, through the driver client in
//! [`client`].
//!
//! A reservation holds places for `TICKETING_HOLD_SECS` unless it is
//! confirmed; a hold past its expiry no longer counts against capacity, and
//! a background task marks it `expired`. Capacity is enforced by the
//! database, across instances: a reservation's transaction locks the
//! ticket's row, then inserts only by a statement that counts the places
//! left.
//!
//! # API and permissions
//!
//! | method and path | permission |
//! |---|---|
//! | `POST /ticketing/v1/{account}/tickets` | `ticketing:{account}:create:ticket` |
//! | `GET /ticketing/v1/{account}/tickets` | `ticketing:{account}:view:ticket` |
//! | `GET /ticketing/v1/{account}/tickets/{id}` | `ticketing:{account}:view:ticket` |
//! | `POST /ticketing/v1/{account}/reservations` | `ticketing:{account}:reserve:ticket` |
//! | `GET /ticketing/v1/{account}/reservations/{id}` | `ticketing:{account}:view:ticket` |
//! | `POST /ticketing/v1/{account}/reservations/{id}/confirm` | `ticketing:{account}:reserve:ticket` |
//! | `POST /ticketing/v1/{account}/reservations/{id}/release` | `ticketing:{account}:reserve:ticket` |
//!
//! Another account's ticket or reservation answers 404, as one that does not
//! exist. Every error is `application/problem+json` with the correlation id;
//! refusals carry a `reason`: `invalid_fields` (422, with `errors` naming
//! each field), `sold_out` (409), `reservation_expired`,
//! `reservation_released`, `reservation_confirmed` (409),
//! `invalid_idempotency_key` (400), `idempotency_key_reused` (422).
//!
//! # Settings
//!
//! The chassis' own (`CHASSIS_*`, see [`chassis::config`]; token
//! verification, `CHASSIS_AUTH_*`, is required) and:
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `TICKETING_HOLD_SECS` | `900` | how long a reservation holds its places unless confirmed (1 to 604800) |
//! | `TICKETING_DATABASE_URL` | unset: SQLite | `postgres://` URL of the database every instance shares |
//! | `TICKETING_DATA_DIR` | `./data/ticketing` | directory of the SQLite file |
//! | `TICKETING_DB_POOL_SIZE` | `4` | SQLite: read connections (the writer is one more); Postgres: the pool holds one more |
//! | `TICKETING_SOLD_OUT_MAIL_TO` | unset | where sold-out notices go; when set, `CHASSIS_CLIENT_*` (this service's own identity) is required and `CHASSIS_DOWNSTREAM_MAIL_*` configures the call |
//!
//! # Messages
//!
//! With a broker configured (`CHASSIS_NATS_URL` and the other
//! `CHASSIS_NATS_*` settings of [`chassis::messaging::MessagingConfig`]),
//! ticketing consumes orders' `reservation.confirm` events from NATS
//! JetStream, requiring `ticketing:{account}:reserve:ticket` of their
//! publisher, as the confirm route does; see [`consume`].
//!
//! # Calls to other services
//!
//! When a hold takes a product's last places, ticketing asks `mail` to
//! send a sold-out notice, **as itself** (its own token, not the buyer's),
//! through mail's driver client: the pattern of every call a service makes
//! in its own name. See `src/alerts.rs`.
//!
//! # Metrics
//!
//! Besides the chassis' own: `ticketing_reservations_total{outcome="held"|"replayed"|"sold_out"}`,
//! `ticketing_holds_expired_total` and
//! `ticketing_sold_out_notices_total{outcome="sent"|"duplicate"|"failed"}`.
//!
//! # Example
//!
//! What `main` does: the chassis reads its settings and the service's
//! together (one list of every problem, exit 78), starts logging, binds,
//! and hands the builder to [`app_on`]:
//!
//! ```no_run
//! use chassis::ServiceBuilder;
//!
//! # async fn run() -> std::process::ExitCode {
//! ServiceBuilder::new(ticketing::NAME, 1)
//!     .run_with(
//!         |r, config| {
//!             if config.auth.is_none() {
//!                 r.problem("CHASSIS_AUTH_ISSUER", "required: every ticketing route requires a permission");
//!             }
//!             ticketing::Settings::read(r)
//!         },
//!         |builder, settings, _address| ticketing::app_on(builder, settings),
//!     )
//!     .await
//! # }
//! ```

use std::time::Duration;

use chassis::{
    ServiceBuilder,
    config::Reader,
    db::{Database, DbConfig, Migrations},
    health::CheckOptions,
    messaging::MessagingConfig,
    shutdown::CancellationToken,
};
use sqlx::migrate::Migrator;

mod alerts;
pub mod client;
pub mod consume;
mod error;
mod routes;
mod store;
mod validation;

pub use alerts::SoldOutNotices;
pub use error::AppError;

use store::Store;

/// The service's name: its routes are under `/ticketing/v1`.
pub const NAME: &str = "ticketing";

/// How long a reservation holds its places unless confirmed, by default:
/// 15 minutes.
const DEFAULT_HOLD_SECS: u64 = 900;

/// The longest hold: a week.
const MAX_HOLD_SECS: u64 = 7 * 24 * 3600;

/// The expiry task runs at least this often (and more often for short holds).
const MAX_EXPIRY_INTERVAL: Duration = Duration::from_secs(60);

/// Reservation attempts by `outcome`: `held`, `replayed`, `sold_out`.
const RESERVATIONS_TOTAL: &str = "ticketing_reservations_total";

/// Held reservations marked expired by the expiry task.
const HOLDS_EXPIRED_TOTAL: &str = "ticketing_holds_expired_total";

/// The schema on SQLite, embedded from `migrations/sqlite/`.
static SQLITE_MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// The same schema on Postgres, embedded from `migrations/postgres/`.
static PG_MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// The service's own settings, `TICKETING_*`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long a reservation holds its places unless confirmed
    /// (`TICKETING_HOLD_SECS`).
    pub hold: Duration,
    /// The database (`TICKETING_DATABASE_URL`, `TICKETING_DATA_DIR`,
    /// `TICKETING_DB_*`).
    pub db: DbConfig,
    /// Sold-out notices to the operators, sent through mail as this
    /// service (`TICKETING_SOLD_OUT_MAIL_TO`; see [`SoldOutNotices`]).
    pub sold_out: Option<SoldOutNotices>,
    /// The broker to consume `reservation.confirm` from
    /// (`CHASSIS_NATS_*`); `None`: confirmations arrive over HTTP only.
    pub nats: Option<MessagingConfig>,
}

/// What the handlers share; each takes its part with `State<Store>` or
/// `State<Alerts>`.
#[derive(Clone, axum::extract::FromRef)]
pub(crate) struct AppState {
    store: Store,
    alerts: alerts::Alerts,
}

impl Settings {
    /// The defaults, with the database under `data_dir` and no sold-out
    /// notices: what a test that runs ticketing in its own process needs.
    pub fn new(data_dir: impl AsRef<std::path::Path>) -> Self {
        Self {
            hold: Duration::from_secs(DEFAULT_HOLD_SECS),
            db: DbConfig::new(data_dir, "ticketing.db"),
            sold_out: None,
            nats: None,
        }
    }

    /// Reads the settings; problems go to `r`, so that one message lists
    /// every problem of the configuration.
    pub fn read(r: &mut Reader<'_>) -> Self {
        let hold_secs: u64 = r.optional(
            "TICKETING_HOLD_SECS",
            DEFAULT_HOLD_SECS,
            "seconds a reservation holds its places unless confirmed",
        );
        if !(1..=MAX_HOLD_SECS).contains(&hold_secs) {
            r.problem(
                "TICKETING_HOLD_SECS",
                format!("must be from 1 to {MAX_HOLD_SECS}"),
            );
        }
        Self {
            hold: Duration::from_secs(hold_secs.clamp(1, MAX_HOLD_SECS)),
            db: DbConfig::read(r, "TICKETING", "ticketing"),
            sold_out: SoldOutNotices::read(r),
            nats: MessagingConfig::read(r),
        }
    }
}

/// The service: opens and migrates the database, and returns the builder
/// with the API, the database's readiness check and the expiry task. Give
/// it the chassis [`Config`](chassis::Config) (and, in tests, a verifier)
/// and run it.
///
/// # Errors
///
/// When the database cannot be opened or migrated.
pub async fn app(settings: Settings) -> Result<ServiceBuilder, AppError> {
    app_on(ServiceBuilder::new(NAME, 1), settings).await
}

/// [`app`] on a builder given by the caller, as
/// [`ServiceBuilder::run_with`] hands one over (with the chassis'
/// configuration set and logging started).
///
/// # Errors
///
/// As [`app`].
pub async fn app_on(
    builder: ServiceBuilder,
    settings: Settings,
) -> Result<ServiceBuilder, AppError> {
    let db = Database::open_migrated(
        &settings.db,
        Migrations::new(&SQLITE_MIGRATOR).postgres(&PG_MIGRATOR),
    )
    .await?;
    let store = Store::new(db.clone(), settings.hold);
    let expiry_interval = settings.hold.min(MAX_EXPIRY_INTERVAL);
    let mut builder = builder;
    if let Some(nats) = &settings.nats {
        // Publishers are verified with the verifier of the API's tokens.
        let verifier = builder
            .shared_verifier()
            .map_err(|e| AppError::Messaging(e.to_string()))?
            .ok_or_else(|| {
                AppError::Messaging(
                    "consuming messages needs token verification (CHASSIS_AUTH_*)".to_owned(),
                )
            })?;
        // Its decisions go where the API's calls are audited.
        let auditor = builder.shared_auditor().map_err(AppError::Messaging)?;
        let consumer = consume::reservation_confirm(nats, verifier, auditor, store.clone())
            .await
            .map_err(|e| AppError::Messaging(e.to_string()))?;
        // Reported, not critical: the API serves without the broker, and a
        // consumer waits (not ready) until the publisher's stream exists,
        // which must not keep this service out of rotation nor make its
        // start-up wait for the publisher's.
        let (name, check, options) = consumer.health_check();
        let task = format!("consumer {}", consumer.name());
        builder = builder
            .health_check(&name, check, options.non_critical())
            .background(&task, move |stop| consumer.run(stop));
    }
    Ok(builder
        .api(routes::api().with_state(AppState {
            store: store.clone(),
            alerts: alerts::Alerts::new(settings.sold_out),
        }))
        .health_check("database", db, CheckOptions::default())
        .background("expire-holds", move |stop| {
            expire_holds(store, expiry_interval, stop)
        })
        .build_info(chassis::build_info!()))
}

/// Marks held reservations past their expiry `expired`, every `interval`,
/// until shutdown.
async fn expire_holds(store: Store, interval: Duration, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        match store.expire_holds().await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(expired = n, "held reservations expired");
                metrics::counter!(HOLDS_EXPIRED_TOTAL).increment(n);
            }
            Err(e) => tracing::warn!(error = %e, "cannot expire held reservations"),
        }
    }
}
