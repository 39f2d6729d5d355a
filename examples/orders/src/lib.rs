//! `orders`: places lift-ticket orders exactly once per idempotency key.
//!
//! What it owns: orders, the idempotency keys that guard their creation, and
//! an outbox of events to deliver, all in its own database: SQLite
//! (`orders.db` in `ORDERS_DATA_DIR`) for one instance, or the Postgres
//! database of `ORDERS_DATABASE_URL` shared by several (see
//! [`chassis::db`]). Several instances place each order once (the keys'
//! claims are conditional writes) and deliver each event from one relay at
//! a time (the outbox is leased, see [`relay`]).
//!
//! Its API has two versions, served side by side on the same data: **v2**
//! (`/orders/v2`, current), where an order holds `lines` and a `contact`
//! ([`client::v2`]), and **v1** (`/orders/v1`), its first shape, kept for
//! the clients that have not moved yet, deprecated: every v1 answer
//! carries `Deprecation`, `Sunset` and a `Link` to v2's document (see
//! [`chassis::service`], "API versions"). The dates are settings
//! (`ORDERS_V1_DEPRECATED`, `ORDERS_V1_SUNSET`, see [`Settings::v1`]); once
//! `http_server_deprecated_requests_total{service="orders"}` stays at zero,
//! a release removes v1.
//!
//! How an order is placed (`POST /orders/v2/{account}/orders`, or v1's):
//!
//! 1. the `Idempotency-Key` is claimed for (account, caller, key) in the
//!    database, or the stored answer is replayed ([`idempotency`]);
//! 2. the tickets are reserved in `ticketing`, as the orders service itself,
//!    through ticketing's driver client: a timeout, a retry budget, a circuit
//!    breaker and a bulkhead guard the call, and the reservation carries an
//!    idempotency key derived from the order's, so a retry never reserves
//!    twice. If ticketing is down the order is refused at once with 503 and
//!    nothing is written;
//! 3. one transaction writes the order, its two outbox events
//!    (`reservation.confirm` for ticketing, `order.placed` for mail) and the
//!    stored answer of the key; then the service answers 201.
//!
//! The relay ([`relay`]) delivers the outbox at least once, with backoff,
//! across restarts, marking an event delivered only after the receiver
//! acknowledged it; ticketing's confirm and mail's queue are idempotent, so
//! each event takes effect once. Without a broker it calls ticketing and
//! mail over HTTP; with `CHASSIS_NATS_URL` set it publishes the events to
//! NATS JetStream instead (`orders.v1.<account>.<event>`, see
//! [`client::events`]), where ticketing and mail consume them.
//!
//! Permissions: `orders:{account}:create:order` to place,
//! `orders:{account}:view:order` to read.

use std::{sync::Arc, time::Duration};

use chassis::{
    ServiceBuilder,
    client::{Downstream, TokenSource},
    config::Reader,
    db::{Database, DbConfig, Migrations},
    health::CheckOptions,
    messaging::{MessagingConfig, MessagingError, Publisher},
    service::ApiVersion,
    time::Timestamp,
};

pub mod client;
pub mod idempotency;
pub mod relay;
mod routes;
mod store;

pub use client::{NewOrder, Order, OrderStatus, OrdersClient};

/// The name of the service.
pub const NAME: &str = "orders";

/// The current version of its API; v1 is served beside it, deprecated.
pub const API_VERSION: u32 = 2;

/// When v1 was deprecated, the day v2 shipped (`ORDERS_V1_DEPRECATED`
/// overrides it): 2026-12-01T00:00:00Z.
pub const V1_DEPRECATED: &str = "2026-12-01T00:00:00Z";

/// When v1 is expected to stop answering (`ORDERS_V1_SUNSET` overrides
/// it): seven months after v2, 2027-06-30T23:59:59Z.
pub const V1_SUNSET: &str = "2027-06-30T23:59:59Z";

/// The service's settings, read from `ORDERS_*` and the chassis'
/// `CHASSIS_DOWNSTREAM_TICKETING_*`, `CHASSIS_DOWNSTREAM_MAIL_*`,
/// `CHASSIS_CLIENT_*` and `CHASSIS_NATS_*` variables.
#[derive(Debug)]
pub struct Settings {
    /// The database.
    pub db: DbConfig,
    /// How long a started request holds its idempotency key before another
    /// attempt may take it over (`ORDERS_IDEMPOTENCY_LEASE_SECS`, default 15).
    pub idempotency_lease: Duration,
    /// The relay's tuning.
    pub relay: relay::RelaySettings,
    /// Where to crash on purpose, for resilience tests
    /// (`ORDERS_FAULT_CRASH`); `None` in normal operation.
    pub crash: Option<CrashPoint>,
    /// Calls to ticketing.
    pub ticketing: Downstream,
    /// Calls to mail.
    pub mail: Downstream,
    /// Orders' own tokens (`CHASSIS_CLIENT_*`): for its calls, and on the
    /// events it publishes.
    pub tokens: Option<TokenSource>,
    /// The broker (`CHASSIS_NATS_*`); `None`: the relay delivers over HTTP.
    pub nats: Option<MessagingConfig>,
    /// Version 1 of the API, deprecated since `ORDERS_V1_DEPRECATED`
    /// (default [`V1_DEPRECATED`]) with its sunset at `ORDERS_V1_SUNSET`
    /// (default [`V1_SUNSET`]), both RFC 3339 times or dates, and the
    /// migration guide of `ORDERS_V1_DEPRECATION_LINK` (a URI, none by
    /// default) as its `rel="deprecation"` link.
    pub v1: ApiVersion,
}

impl Settings {
    /// Reads the settings; every problem goes to `r` (and when there is
    /// one, the reader's `finish` fails and these settings are not used).
    pub fn read(r: &mut Reader<'_>) -> Self {
        let db = DbConfig::read(r, "ORDERS", "orders");
        let lease: u64 = r.optional(
            "ORDERS_IDEMPOTENCY_LEASE_SECS",
            15,
            "how long a started request holds its key, seconds",
        );
        let relay = relay::RelaySettings::read(r);
        let crash: Option<CrashPoint> = r.maybe(
            "ORDERS_FAULT_CRASH",
            "crash on purpose: before_commit or after_commit (resilience tests only)",
        );
        let tokens = TokenSource::read_required(
            r,
            "orders calls ticketing and mail as itself (client credentials)",
        );
        let ticketing = Downstream::builder("ticketing", "http://127.0.0.1:8082")
            .token_source(tokens.clone())
            .read(r);
        let mail = Downstream::builder("mail", "http://127.0.0.1:8084")
            .token_source(tokens.clone())
            .read(r);
        let nats = MessagingConfig::read(r);
        let default = |s: &str| s.parse::<Timestamp>().expect("a valid default");
        let deprecated = r.optional(
            "ORDERS_V1_DEPRECATED",
            default(V1_DEPRECATED),
            "when API v1 was deprecated, RFC 3339 or a date",
        );
        let sunset = r.optional(
            "ORDERS_V1_SUNSET",
            default(V1_SUNSET),
            "when API v1 stops answering, RFC 3339 or a date",
        );
        let mut v1 = ApiVersion::new(1).deprecated(deprecated.0).sunset(sunset.0);
        if let Some(link) = r.maybe::<String>(
            "ORDERS_V1_DEPRECATION_LINK",
            "a URI explaining the move from API v1 to v2",
        ) {
            v1 = v1.deprecation_link(&link);
        }
        Self {
            db,
            idempotency_lease: Duration::from_secs(lease.max(1)),
            relay,
            crash,
            ticketing,
            mail,
            tokens,
            nats,
            v1,
        }
    }
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The database could not be opened or migrated.
    #[error(transparent)]
    Database(#[from] chassis::db::DbError),
    /// The broker could not be set up (its stream not created).
    #[error("messaging: {0}")]
    Messaging(#[from] MessagingError),
}

/// What the handlers and the relay share.
#[derive(Clone)]
pub(crate) struct State {
    pub(crate) db: Database,
    pub(crate) ticketing: ticketing::client::TicketingClient,
    pub(crate) lease: Duration,
    pub(crate) crash: Option<CrashPoint>,
}

/// A point in placing an order where the process aborts on purpose when
/// `ORDERS_FAULT_CRASH` names it, as a `kill -9` there would: the failure
/// injection behind the "nothing half-made" tests. Never set it in
/// production.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// After the order, its events and its stored answer are written, before
    /// the transaction commits: nothing may remain.
    BeforeCommit,
    /// After the commit, before the answer is sent: a retry must replay it.
    AfterCommit,
}

impl std::str::FromStr for CrashPoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "before_commit" => Ok(Self::BeforeCommit),
            "after_commit" => Ok(Self::AfterCommit),
            _ => Err("expected before_commit or after_commit".to_owned()),
        }
    }
}

impl CrashPoint {
    /// Aborts the process if `self` is `at`.
    pub(crate) fn reached(point: Option<Self>, at: Self) {
        if point == Some(at) {
            tracing::error!(point = ?at, "ORDERS_FAULT_CRASH: aborting on purpose");
            std::process::abort();
        }
    }
}

/// The service's migrations, for either engine.
pub(crate) fn migrations() -> Migrations<'static> {
    static SQLITE: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
    static POSTGRES: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");
    Migrations::new(&SQLITE).postgres(&POSTGRES)
}

/// The service: opens and migrates the database, and returns the builder
/// with the API, the readiness checks and the outbox relay (publishing to
/// the broker when one is configured).
///
/// # Errors
///
/// When the database cannot be opened or migrated, or the broker's stream
/// cannot be created (the broker must be reachable at start-up).
pub async fn app(settings: Settings) -> Result<ServiceBuilder, AppError> {
    app_on(ServiceBuilder::new(NAME, API_VERSION), settings).await
}

/// [`app`] on a builder given by the caller, as
/// [`ServiceBuilder::run_with`] hands one over (with the chassis'
/// configuration set and logging started): one made with
/// `ServiceBuilder::new(NAME, API_VERSION)`, to which v2's routes are
/// added, and v1's beside them.
///
/// # Errors
///
/// As [`app`].
pub async fn app_on(
    builder: ServiceBuilder,
    settings: Settings,
) -> Result<ServiceBuilder, AppError> {
    let db = Database::open_migrated(&settings.db, migrations()).await?;
    let ticketing_breaker = settings.ticketing.breaker().clone();
    let mail_breaker = settings.mail.breaker().clone();
    let state = State {
        db: db.clone(),
        ticketing: ticketing::client::TicketingClient::new(settings.ticketing.clone()),
        lease: settings.idempotency_lease,
        crash: settings.crash,
    };
    if let Some(point) = settings.crash {
        tracing::warn!(
            ?point,
            "ORDERS_FAULT_CRASH is set: orders will abort on purpose"
        );
    }
    let transport = match &settings.nats {
        None => relay::Transport::Http {
            ticketing: ticketing::client::TicketingClient::new(settings.ticketing.clone()),
            mail: mail::client::MailClient::new(settings.mail.clone()),
        },
        Some(nats) => publish_to(nats, &settings).await?,
    };
    let relay = relay::Relay::new(db.clone(), transport, settings.relay);
    let parked = relay.parked_check();
    let non_critical = CheckOptions {
        critical: false,
        ..CheckOptions::default()
    };
    let state = Arc::new(state);
    let v1 = routes::api().with_state(state.clone());
    let v2 = routes::v2::api().with_state(state);
    Ok(builder
        .api(v2)
        .version(settings.v1.clone(), v1)
        .health_check("database-writes", db.write_check(), CheckOptions::default())
        .health_check("database", db, CheckOptions::default())
        .health_check("ticketing-breaker", ticketing_breaker, non_critical)
        .health_check("mail-breaker", mail_breaker, non_critical)
        .health_check("outbox-parked", parked, non_critical)
        .background("outbox-relay", move |stop| relay.run(stop))
        .build_info(chassis::build_info!()))
}

/// The relay's JetStream transport: orders' stream, and a publisher per
/// event whose token is for its consumer's audience (that of orders' calls
/// to it, `CHASSIS_DOWNSTREAM_<NAME>_AUDIENCE`).
async fn publish_to(
    nats: &MessagingConfig,
    settings: &Settings,
) -> Result<relay::Transport, AppError> {
    let service = nats.name(NAME);
    let tokens = settings.tokens.clone().ok_or_else(|| {
        MessagingError::Token("no client credentials (CHASSIS_CLIENT_*)".to_owned())
    })?;
    let client = nats.connect(&service).await?;
    let for_consumer = |d: &Downstream| match &d.settings().audience {
        Some(audience) => tokens.for_audience(audience),
        None => tokens.clone(),
    };
    let versions = [client::events::VERSION];
    let confirm = Publisher::new(
        client.clone(),
        nats,
        &service,
        &versions,
        for_consumer(&settings.ticketing),
    )
    .await?;
    let placed = Publisher::new(
        client,
        nats,
        &service,
        &versions,
        for_consumer(&settings.mail),
    )
    .await?;
    tracing::info!(stream = %chassis::messaging::stream_name(&service), "outbox events are published to NATS JetStream");
    Ok(relay::Transport::Nats {
        confirm,
        placed,
        service,
    })
}
