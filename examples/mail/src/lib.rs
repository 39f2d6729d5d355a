//! `mail`: accepts mail jobs at least once and sends each exactly once.
//!
//! # Overview
//!
//! Other services (`orders`' outbox relay) post jobs to
//! `POST /mail/v1/messages`; each job has a `message_id` chosen by the
//! caller, and a job whose `message_id` was seen before is answered with the
//! stored status and not queued again, so callers may deliver at least
//! once. Jobs wait in a queue in the service's database (SQLite in
//! `MAIL_DATA_DIR`, or the Postgres database of `MAIL_DATABASE_URL`, shared
//! by several instances); workers of every instance lease them one at a
//! time, render the template, and send the mail through
//! an SMTP relay (`MAIL_SMTP_URL`) or, by default, to a file
//! `<MAIL_DATA_DIR>/outbox/<message_id>.eml`. Failed sends are retried with
//! exponential backoff and full jitter, then parked as `dead`. See
//! [`delivery`] for the guarantees and what they rest on, and the README
//! for how to run it.
//!
//! # SMTP, TLS and connections
//!
//! Which `MAIL_SMTP_URL` to use (see [`SmtpRelay`]):
//!
//! * `smtps://host` (port 465): implicit TLS, the default choice for a
//!   relay reached over any network (RFC 8314 prefers it to STARTTLS).
//! * `smtp://host:587?tls=required`: STARTTLS, required: for a relay that
//!   offers only that. A relay that does not offer STARTTLS fails the send
//!   (retried with backoff, never sent in plain text); there is no
//!   "opportunistic" mode, which an attacker on the path can downgrade.
//! * `smtp://127.0.0.1:25`: plain, only to a relay on loopback or a
//!   trusted link (a local MTA, a sidecar) that forwards with TLS.
//!
//! TLS runs on rustls with aws-lc-rs (the crypto library of the token
//! verification), trusts the platform's roots (`SSL_CERT_FILE` and
//! `SSL_CERT_DIR` honoured) plus the PEM bundle in `CHASSIS_TLS_CA_FILE`
//! (the chassis' [`ClientTls`](chassis::tls::ClientTls)), and always verifies the certificate chain and the host
//! name. A missing, unreadable or invalid `CHASSIS_TLS_CA_FILE` stops the
//! start like any other invalid setting.
//!
//! The SMTP client is built once at start-up and shared by the workers; it
//! keeps up to `MAIL_SMTP_POOL_SIZE` idle connections and sends each mail
//! on one of them (0: a new connection per mail). The workers
//! (`MAIL_WORKERS`) are what sends several mails at once: each holds one
//! message and at most one connection. Reuse changes nothing of the
//! guarantees: a mail is sent in one transaction on one connection, and a
//! connection that saw an error is closed, never reused.
//!
//! | method and path | permission |
//! |---|---|
//! | `POST /mail/v1/messages` | `mail::send:message` |
//! | `GET /mail/v1/messages/{id}` | `mail::view:message` |
//!
//! Other services call it through the typed [`client::MailClient`]. With
//! a broker configured (`CHASSIS_NATS_URL`), mail also consumes orders'
//! `order.placed` events from NATS JetStream, requiring
//! `mail::send:message` of their publisher, and queues their
//! confirmations through the same code as `POST /messages` (see
//! [`consume`]).
//!
//! # Example
//!
//! ```no_run
//! use chassis::config::{Config, Env, Reader};
//!
//! # async fn run() -> std::process::ExitCode {
//! let env = Env::process();
//! let mut r = Reader::new(&env);
//! let config = Config::read(&mut r);
//! if config.auth.is_none() {
//!     r.problem("CHASSIS_AUTH_ISSUER", "required: every mail route requires a permission");
//! }
//! let settings = mail::Settings::read(&mut r);
//! if let Err(e) = r.finish() {
//!     e.exit();
//! }
//! mail::app(settings).await.unwrap().config(config).run().await
//! # }
//! ```

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use chassis::{
    ServiceBuilder,
    config::Reader,
    db::{Database, DbConfig, DbError, Migrations},
    health::{Check, CheckError, CheckOptions},
    messaging::{MessagingConfig, MessagingError},
};
use lettre::Address;
use tokio::sync::Notify;

use crate::{
    delivery::Worker,
    routes::AppState,
    store::Store,
    transport::{Smtp, Transport},
};

pub mod client;
pub mod consume;
pub mod delivery;
mod format;
mod job;
mod meters;
mod routes;
mod store;
mod template;
mod tls;
mod transport;

pub use delivery::RetryPolicy;
pub use transport::{Security, SmtpRelay};

/// The name of the service.
pub const NAME: &str = "mail";

/// The name of the directory of the file transport, in the data directory.
pub const OUTBOX_DIR: &str = "outbox";

/// Longest a send in flight may still take once shutdown starts, unless
/// `MAIL_SHUTDOWN_FINISH_MS` says otherwise.
const DEFAULT_FINISH: Duration = Duration::from_secs(5);

/// Idle SMTP connections kept, unless `MAIL_SMTP_POOL_SIZE` says otherwise.
const DEFAULT_SMTP_POOL_SIZE: usize = 4;

/// How often the queue depth is measured.
const DEPTH_INTERVAL: Duration = Duration::from_secs(1);

/// The service's own settings (`MAIL_*`).
///
/// | variable | default | meaning |
/// |---|---|---|
/// | `MAIL_SMTP_URL` | none: write files | `smtps://…` (TLS), `smtp://…?tls=required` (STARTTLS) or `smtp://…` (plain, loopback only): `[user:password@]host[:port][/helo-name]`, a [`SmtpRelay`]; a secret |
/// | `MAIL_SMTP_POOL_SIZE` | `4` | idle SMTP connections kept for reuse, 0 to 64 (0: one connection per mail) |
/// | `CHASSIS_TLS_CA_FILE` | none | PEM bundle of extra CAs trusted for TLS to the relay, besides the platform's (the chassis' [`ClientTls`](chassis::tls::ClientTls)) |
/// | `MAIL_FROM` | `tickets@chassis.example` | sender address |
/// | `MAIL_WORKERS` | `1` | delivery workers, each sending one mail at a time (0: accept jobs, deliver none) |
/// | `MAIL_MAX_ATTEMPTS` | `8` | attempts before a message is dead |
/// | `MAIL_RETRY_BASE_MS` | `1000` | longest wait after the first failure |
/// | `MAIL_RETRY_MAX_MS` | `60000` | longest wait after any failure |
/// | `MAIL_LEASE_SECS` | `60` | how long a worker holds a message; a send is cut at half of it |
/// | `MAIL_POLL_MS` | `200` | how often an idle worker looks for due messages |
/// | `MAIL_SHUTDOWN_FINISH_MS` | `5000` | how long a send in flight may still take after shutdown starts |
/// | `MAIL_DATABASE_URL` | unset: SQLite | `postgres://…`: the queue lives in that Postgres database, shared by every instance (see [`chassis::db`]) |
/// | `MAIL_DATA_DIR` | `./data/mail` | SQLite database `mail.db` and the `outbox/` of the file transport |
/// | `MAIL_DB_POOL_SIZE` | `4` | connections to the database, plus one (SQLite: the readers, the writer being one more) |
/// | `CHASSIS_NATS_URL` and `CHASSIS_NATS_*` | unset: no broker | consume `order.placed` from NATS JetStream ([`consume`], [`MessagingConfig`]) |
#[derive(Debug, Clone)]
pub struct Settings {
    /// The SMTP relay; `None` writes files to the outbox directory.
    pub smtp: Option<SmtpRelay>,
    /// Idle SMTP connections kept for reuse; 0 opens one per mail.
    pub smtp_pool_size: usize,
    /// The roots trusted for TLS to the relay: the platform's plus
    /// `CHASSIS_TLS_CA_FILE`.
    pub tls: chassis::tls::ClientTls,
    /// The sender.
    pub from: Address,
    /// Delivery workers.
    pub workers: usize,
    /// Attempts and backoff of failed sends.
    pub retry: RetryPolicy,
    /// How long a worker holds a leased message.
    pub lease: Duration,
    /// How often an idle worker looks for due messages.
    pub poll: Duration,
    /// How long a send in flight may still take after shutdown starts;
    /// after that it is abandoned and sent again once its lease expires.
    pub shutdown_finish: Duration,
    /// The database and data directory.
    pub db: DbConfig,
    /// The broker to consume `order.placed` from; `None`: jobs arrive over
    /// HTTP only.
    pub nats: Option<MessagingConfig>,
}

/// A whole number within bounds, for settings.
#[derive(Debug, Clone, Copy)]
struct Bounded<const MIN: u64, const MAX: u64>(u64);

impl<const MIN: u64, const MAX: u64> std::str::FromStr for Bounded<MIN, MAX> {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.parse::<u64>() {
            Ok(n) if (MIN..=MAX).contains(&n) => Ok(Self(n)),
            _ => Err(format!("expected a whole number from {MIN} to {MAX}")),
        }
    }
}

/// An address as `MAIL_FROM` takes it.
#[derive(Debug, Clone)]
struct FromAddress(Address);

impl std::str::FromStr for FromAddress {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        format::parse_address(s).map(Self)
    }
}

impl Settings {
    /// Defaults, with the data directory `data_dir`.
    pub fn new(data_dir: impl AsRef<Path>) -> Self {
        Self {
            smtp: None,
            smtp_pool_size: DEFAULT_SMTP_POOL_SIZE,
            tls: chassis::tls::ClientTls::global(),
            from: "tickets@chassis.example"
                .parse()
                .expect("the default sender is a valid address"),
            workers: 1,
            retry: RetryPolicy {
                max_attempts: 8,
                base: Duration::from_millis(1000),
                max: Duration::from_millis(60_000),
            },
            lease: Duration::from_secs(60),
            poll: Duration::from_millis(200),
            shutdown_finish: DEFAULT_FINISH,
            db: DbConfig::new(data_dir, "mail.db"),
            nats: None,
        }
    }

    /// Reads `MAIL_*` (see the table above); problems go to `r`, so one
    /// message lists them with the chassis' own.
    pub fn read(r: &mut Reader<'_>) -> Self {
        let db = DbConfig::read(r, "MAIL", "mail");
        let d = Self::new(&db.data_dir);
        let smtp = r
            .maybe_secret(
                "MAIL_SMTP_URL",
                "SMTP relay, smtps://, smtp://…?tls=required or smtp://",
            )
            .and_then(|url| match url.expose().parse::<SmtpRelay>() {
                Ok(relay) => Some(relay),
                Err(e) => {
                    r.problem("MAIL_SMTP_URL", format!("invalid SMTP URL: {e}"));
                    None
                }
            });
        let smtp_pool_size = r
            .optional(
                "MAIL_SMTP_POOL_SIZE",
                Bounded::<0, 64>(DEFAULT_SMTP_POOL_SIZE as u64),
                "idle SMTP connections kept for reuse",
            )
            .0;
        // Read as the chassis' configuration reads it: a bad file is one
        // problem, however many readers look at it.
        let ca_file = r.maybe::<PathBuf>(
            chassis::tls::CA_FILE_VAR,
            "PEM file of extra CAs trusted by outbound TLS",
        );
        let tls = chassis::tls::ClientTls::from_ca_file(ca_file.as_deref()).unwrap_or_else(|e| {
            r.problem(chassis::tls::CA_FILE_VAR, e.to_string());
            chassis::tls::ClientTls::global()
        });
        let from = r
            .optional("MAIL_FROM", FromAddress(d.from.clone()), "sender address")
            .0;
        let workers = r
            .optional("MAIL_WORKERS", Bounded::<0, 64>(1), "delivery workers")
            .0;
        let max_attempts = r
            .optional(
                "MAIL_MAX_ATTEMPTS",
                Bounded::<1, 1000>(8),
                "attempts before a message is dead",
            )
            .0;
        let base = r
            .optional(
                "MAIL_RETRY_BASE_MS",
                Bounded::<1, 86_400_000>(1000),
                "longest wait after the first failure, ms",
            )
            .0;
        let max = r
            .optional(
                "MAIL_RETRY_MAX_MS",
                Bounded::<1, 86_400_000>(60_000),
                "longest wait after any failure, ms",
            )
            .0;
        if max < base {
            r.problem("MAIL_RETRY_MAX_MS", "must be at least MAIL_RETRY_BASE_MS");
        }
        let lease = r
            .optional(
                "MAIL_LEASE_SECS",
                Bounded::<1, 86_400>(60),
                "how long a worker holds a message, s",
            )
            .0;
        let poll = r
            .optional(
                "MAIL_POLL_MS",
                Bounded::<10, 60_000>(200),
                "how often an idle worker looks for messages, ms",
            )
            .0;
        let finish = r
            .optional(
                "MAIL_SHUTDOWN_FINISH_MS",
                Bounded::<0, 600_000>(5000),
                "how long a send may still take after shutdown starts, ms",
            )
            .0;
        Self {
            smtp,
            smtp_pool_size: usize::try_from(smtp_pool_size).unwrap_or(DEFAULT_SMTP_POOL_SIZE),
            tls,
            from,
            workers: usize::try_from(workers).unwrap_or(1),
            retry: RetryPolicy {
                max_attempts: u32::try_from(max_attempts).unwrap_or(8),
                base: Duration::from_millis(base),
                max: Duration::from_millis(max.max(base)),
            },
            lease: Duration::from_secs(lease),
            poll: Duration::from_millis(poll),
            shutdown_finish: Duration::from_millis(finish),
            db,
            nats: MessagingConfig::read(r),
        }
    }

    /// The directory of the file transport.
    pub fn outbox_dir(&self) -> PathBuf {
        self.db.data_dir.join(OUTBOX_DIR)
    }

    /// Longest a send may take: half the lease, so the message is not
    /// taken by another worker while it is still being sent.
    pub fn send_timeout(&self) -> Duration {
        (self.lease / 2).max(Duration::from_millis(500))
    }
}

/// Why the service could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppError {
    /// The database could not be opened or migrated.
    #[error(transparent)]
    Database(#[from] DbError),
    /// The SMTP client could not be set up (e.g. no trusted root for TLS).
    #[error("cannot set up SMTP: {0}")]
    Smtp(String),
    /// The consumer of `order.placed` could not be set up.
    #[error("messaging: {0}")]
    Messaging(String),
    /// The outbox directory could not be created.
    #[error("cannot create the outbox directory {path}: {source}")]
    Outbox {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The service: opens and migrates the database, and returns the builder
/// with the API, the workers and the health checks; add the chassis
/// configuration (and in tests, a verifier) and run it.
///
/// # Errors
///
/// When the database cannot be opened or migrated, the outbox directory
/// cannot be created, TLS to the relay cannot be set up (no trusted
/// root at all), or a broker is configured but no token verifier (the
/// builder needs its configuration, or a verifier, to consume).
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
        Migrations::new(&sqlx::migrate!("./migrations/sqlite"))
            .postgres(&sqlx::migrate!("./migrations/postgres")),
    )
    .await?;
    let store = Store::new(db.clone());
    let transport = Arc::new(match &settings.smtp {
        Some(relay) => {
            let trust = match relay.security() {
                Security::Plain => None,
                Security::StartTls | Security::Tls => {
                    Some(tls::trust(&settings.tls).map_err(AppError::Smtp)?)
                }
            };
            let smtp = Smtp::new(
                relay,
                trust,
                settings.send_timeout(),
                settings.smtp_pool_size,
            )
            .map_err(AppError::Smtp)?;
            tracing::info!(
                relay = %format!("{}:{}", relay.host(), relay.port()),
                security = relay.security().as_str(),
                pool_size = settings.smtp_pool_size,
                "SMTP relay configured"
            );
            Transport::Smtp(Box::new(smtp))
        }
        None => {
            let dir = settings.outbox_dir();
            std::fs::create_dir_all(&dir).map_err(|source| AppError::Outbox {
                path: dir.clone(),
                source,
            })?;
            tracing::info!(dir = %dir.display(), "no SMTP relay configured: mail is written to files");
            Transport::files(dir)
        }
    });
    meters::describe();
    let wake = Arc::new(Notify::new());
    let state = AppState {
        store: store.clone(),
        wake: wake.clone(),
    };

    let mut builder = builder;
    if let Some(nats) = &settings.nats {
        builder = consume_from(builder, nats, state.clone()).await?;
    }
    let mut builder = builder
        .api(routes::api().with_state(state))
        .health_check("database", db, CheckOptions::default())
        .health_check(
            "dead-messages",
            DeadMessages(store.clone()),
            // A count is exact: no hysteresis needed.
            CheckOptions::default().non_critical().thresholds(1, 1),
        );
    // Unique across every instance sharing the database, wherever it runs
    // (process ids repeat across hosts and containers).
    let instance = chassis::id::prefixed("mail");
    for i in 0..settings.workers {
        let worker = Worker {
            store: store.clone(),
            transport: transport.clone(),
            from: settings.from.clone(),
            policy: settings.retry,
            lease: settings.lease,
            poll: settings.poll,
            send_timeout: settings.send_timeout(),
            finish: settings.shutdown_finish,
            wake: wake.clone(),
            owner: format!("{instance}-{i}"),
        };
        builder = builder.background(&format!("mail-worker-{i}"), move |stop| worker.run(stop));
    }
    Ok(builder
        .background("mail-queue-depth", move |stop| async move {
            loop {
                match store.depth().await {
                    Ok(depth) => meters::queue_depth(depth),
                    Err(e) => tracing::warn!(error = %e, "cannot measure the queue depth"),
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(DEPTH_INTERVAL) => {}
                }
            }
        })
        .build_info(chassis::build_info!()))
}

/// Adds the consumer of `order.placed` to `builder`: its readiness check
/// and its task. It verifies publishers with the service's own verifier.
async fn consume_from(
    mut builder: ServiceBuilder,
    nats: &MessagingConfig,
    state: AppState,
) -> Result<ServiceBuilder, AppError> {
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
    let consumer = consume::order_placed(nats, verifier, auditor, state)
        .await
        .map_err(|e: MessagingError| AppError::Messaging(e.to_string()))?;
    // Reported, not critical: the API serves without the broker, and a
    // consumer waits (not ready) until the publisher's stream exists,
    // which must not keep this service out of rotation nor make its
    // start-up wait for the publisher's.
    let (name, check, options) = consumer.health_check();
    let task = format!("consumer {}", consumer.name());
    Ok(builder
        .health_check(&name, check, options.non_critical())
        .background(&task, move |stop| consumer.run(stop)))
}

/// Down while any message is dead: they need an operator (fix the cause,
/// then requeue them). Non-critical: the service still takes jobs.
#[derive(Debug, Clone)]
struct DeadMessages(Store);

impl Check for DeadMessages {
    async fn check(&self) -> Result<(), CheckError> {
        match self.0.dead().await {
            Ok(0) => Ok(()),
            Ok(n) => Err(CheckError::new(format!(
                "{n} dead message{}",
                if n == 1 { "" } else { "s" }
            ))),
            Err(e) => Err(CheckError::new(format!("cannot count dead messages: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use chassis::config::Env;

    use super::*;

    fn read(pairs: &[(&str, &str)]) -> Result<Settings, chassis::config::ConfigError> {
        let env = Env::from_pairs(pairs.iter().copied());
        let mut r = Reader::new(&env);
        let s = Settings::read(&mut r);
        r.finish().map(|()| s)
    }

    #[test]
    fn defaults_match_the_contract() {
        let s = read(&[]).unwrap();
        assert!(s.smtp.is_none());
        assert_eq!(s.from.to_string(), "tickets@chassis.example");
        assert_eq!(s.workers, 1);
        assert_eq!(s.smtp_pool_size, 4);
        assert_eq!(s.tls.extra_root_count(), 0);
        assert_eq!(s.retry.max_attempts, 8);
        assert_eq!(s.retry.base, Duration::from_secs(1));
        assert_eq!(s.retry.max, Duration::from_secs(60));
        assert_eq!(s.lease, Duration::from_secs(60));
        assert_eq!(s.poll, Duration::from_millis(200));
        assert_eq!(s.db.path(), PathBuf::from("data/mail/mail.db"));
        assert_eq!(s.outbox_dir(), PathBuf::from("data/mail/outbox"));
    }

    #[test]
    fn every_problem_is_reported_and_the_password_never() {
        let err = read(&[
            (
                "MAIL_SMTP_URL",
                "smtp://u:hunter2@mail.example?tls=opportunistic",
            ),
            ("MAIL_SMTP_POOL_SIZE", "65"),
            ("CHASSIS_TLS_CA_FILE", "/nonexistent/ca.pem"),
            ("MAIL_FROM", "nobody"),
            ("MAIL_WORKERS", "-1"),
            ("MAIL_MAX_ATTEMPTS", "0"),
            ("MAIL_RETRY_BASE_MS", "5000"),
            ("MAIL_RETRY_MAX_MS", "10"),
            ("MAIL_LEASE_SECS", "forever"),
            ("MAIL_POLL_MS", "1"),
        ])
        .unwrap_err();
        let names: Vec<_> = err.problems().iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "MAIL_SMTP_URL",
                "MAIL_SMTP_POOL_SIZE",
                "CHASSIS_TLS_CA_FILE",
                "MAIL_FROM",
                "MAIL_WORKERS",
                "MAIL_MAX_ATTEMPTS",
                "MAIL_RETRY_MAX_MS",
                "MAIL_LEASE_SECS",
                "MAIL_POLL_MS"
            ]
        );
        assert!(!err.to_string().contains("hunter2"), "{err}");

        let s = read(&[
            ("MAIL_SMTP_URL", "smtp://u:hunter2@127.0.0.1:2525"),
            ("MAIL_WORKERS", "3"),
            ("MAIL_DATA_DIR", "/srv/mail"),
        ])
        .unwrap();
        assert_eq!(s.smtp.as_ref().unwrap().port(), 2525);
        assert_eq!(s.workers, 3);
        assert_eq!(s.outbox_dir(), PathBuf::from("/srv/mail/outbox"));
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
