//! `auth` owns the users and service clients of the exemplar system, issues
//! every token, and publishes the keys that verify them.
//!
//! * `POST /auth/v1/token` (public): the OAuth 2.0 token endpoint: the
//!   password grant for users (an access token and a refresh token), the
//!   client-credentials grant for services (an access token), the
//!   refresh-token grant with rotation and reuse detection, and the
//!   token-exchange grant (RFC 8693) by which a service gets a token for
//!   another service on its caller's behalf.
//! * `GET /auth/v1/jwks` (public): the public signing keys, current and
//!   previous.
//! * `GET /auth/v1/.well-known/openid-configuration` (public): the OpenID
//!   Connect discovery document; found from the issuer when `AUTH_ISSUER`
//!   is `<origin>/auth/v1`.
//! * `POST /auth/v1/keys/rotate` (`auth::rotate:key`): make a new signing
//!   key current now.
//! * `GET`, `PUT /auth/v1/clients/{client_id}/grants` and
//!   `/auth/v1/users/{username}/grants` (`auth::view:grant`,
//!   `auth::manage:grant`), `POST /auth/v1/clients`
//!   (`auth::register:client`): the admin API of grants.
//!
//! # Permissions as data
//!
//! Users, service clients and their grants are data, not code. The grants
//! file named by `AUTH_GRANTS_FILE` (TOML) declares them:
//!
//! ```toml
//! [clients.keycards]
//! secret_env = "KEYCARDS_CLIENT_SECRET"   # or secret_hash = "$argon2id$v=19$..."
//! grants = ["ticketing:*:view:ticket", "auth:ticketing:exchange:token"]
//!
//! [users.carol]
//! password_hash = "$argon2id$v=19$m=19456,t=2,p=1$..."
//! grants = ["ticketing:acme:*:*", "!ticketing:acme:delete:ticket"]
//! ```
//!
//! A secret is given by reference (`secret_env`, the name of an environment
//! variable) or as an argon2id hash (`secret_hash`); a literal `secret` (or
//! `password`) is accepted only in a file that says `demo = true`. The file
//! is read at start-up, where any problem stops the service with exit 78
//! and every problem listed, and looked at again every
//! `AUTH_GRANTS_POLL_SECS`. Applying it upserts: each subject it names gets
//! its secret and grants, new or not, and subjects it named before but no
//! longer names are removed (with a user's refresh tokens). A grant added or
//! removed reaches the subject's next token, with no restart and nothing
//! wiped. A later change with problems is refused whole: the grants last
//! applied stay in force, each problem is logged, the refusal is counted in
//! `auth_grants_file_rejected_total`, and the `grants-file` readiness check
//! reports it (readiness does not depend on it).
//!
//! The file is authoritative for what it names. Subjects it does not name
//! are managed through the admin API: a client registered there
//! (`POST /auth/v1/clients`, whose answer carries the secret, once) and any
//! subject's grants replaced there (`PUT .../grants`), unless the file names
//! it (409 `managed_by_file`). Naming an API-managed subject in the file
//! hands it to the file. Every admin call is audited like any other route.
//!
//! Access tokens are EdDSA (Ed25519) JWTs that every chassis service
//! verifies locally with the key set; passwords and client secrets are
//! argon2id hashes; refresh tokens are stored only as their SHA-256. The
//! contract is `docs/system.md`, section "auth"; this crate's `README.md`
//! shows how to run and test it.
//!
//! Each token is for one audience: the `audience` asked for (one of
//! `AUTH_AUDIENCES`), or `AUTH_DEFAULT_AUDIENCE`. A narrower `scope` never
//! drops the subject's deny grants. Failed logins are throttled per user
//! name or client id, per client address and in total (429 with
//! `Retry-After`, `AUTH_LOGIN_*`; behind a proxy every client has the
//! proxy's address, and `X-Forwarded-For` is deliberately not trusted),
//! and password hashing is bounded (`AUTH_HASH_CONCURRENCY`; 503 with
//! `Retry-After` after `AUTH_HASH_QUEUE_MS`). The demo users and clients
//! ([`DEMO_GRANTS`]), whose passwords are public, exist only with
//! `AUTH_SEED_DEMO=true`. The settings are in [`Settings::read`].
//!
//! Run with `cargo run -p auth` (with `CHASSIS_BIND=127.0.0.1:8081` and
//! `AUTH_SEED_DEMO=true`), then
//! `curl -s -d grant_type=password -d username=alice -d password=alice-password localhost:8081/auth/v1/token`.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use chassis::{
    ServiceBuilder,
    auth::{Clock, JwksOptions, SystemClock, Verifier},
    config::{Config, Reader},
    db::{Database, DbConfig, Migrations},
    health::{CheckOptions, check_fn},
};
use jsonwebtoken::Algorithm;
use sqlx::migrate::Migrator;
use tokio_util::sync::CancellationToken;

mod admin;
pub mod client;
mod discovery;
mod error;
mod exchange;
mod grants;
mod keys;
mod password;
mod routes;
mod store;
mod throttle;
mod token;

pub use error::AppError;
pub use grants::DEMO_GRANTS;

/// The service's name: its API lives under `/auth/v1`.
pub const NAME: &str = "auth";

/// The schema on SQLite, embedded from `migrations/sqlite/` and run at
/// start-up.
static SQLITE_MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// The same schema on Postgres, from `migrations/postgres/`.
static PG_MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// Longest access-token lifetime accepted (the chassis verifier's limit).
const MAX_TOKEN_TTL_SECS: u64 = 86_400;

/// The cost of argon2id hashes of new passwords and secrets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashCost {
    /// `AUTH_HASH_MEMORY_KIB`: memory per hash in KiB (default 19456, i.e.
    /// 19 MiB, OWASP's recommendation).
    pub memory_kib: u32,
    /// `AUTH_HASH_ITERATIONS`: passes over the memory (default 2).
    pub iterations: u32,
}

impl Default for HashCost {
    fn default() -> Self {
        Self {
            memory_kib: argon2::Params::DEFAULT_M_COST,
            iterations: argon2::Params::DEFAULT_T_COST,
        }
    }
}

/// Brute-force protection of the token endpoint (`AUTH_LOGIN_*`): how
/// many failed logins a user name or client id, a client address, and all
/// of them together, may have before attempts are answered 429 without
/// checking the password.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginLimits {
    /// `AUTH_LOGIN_MAX_FAILURES`: failures of one name before it is locked
    /// (default 5).
    pub max_failures: u32,
    /// `AUTH_LOGIN_WINDOW_SECS`: how long a name's failures are remembered
    /// after its last one (default 900, 15 minutes).
    pub window: Duration,
    /// `AUTH_LOGIN_LOCKOUT_SECS`: the first lock of a name (default 60); each
    /// further failure after a lock doubles it.
    pub lockout: Duration,
    /// `AUTH_LOGIN_MAX_LOCKOUT_SECS`: the longest lock (default 900).
    pub max_lockout: Duration,
    /// `AUTH_LOGIN_ADDRESS_MAX_FAILURES`: failures from one client address
    /// (an IPv4 address, an IPv6 /64), whatever the names, before it is
    /// locked (default 20), with the same window and locks as a name. A
    /// success does not forget them. Behind a proxy every client has the
    /// proxy's address, so this counts all of them together: raise it
    /// there (1000000 in effect turns it off). `X-Forwarded-For` is not
    /// trusted, since any client can send it.
    pub address_max_failures: u32,
    /// `AUTH_LOGIN_GLOBAL_MAX_FAILURES`: failures of all names together per
    /// global window before every attempt waits (default 100).
    pub global_max_failures: u32,
    /// `AUTH_LOGIN_GLOBAL_WINDOW_SECS`: the global window (default 60).
    pub global_window: Duration,
    /// `AUTH_LOGIN_TRACKED_NAMES`: most names tracked at once, and most
    /// addresses; the one seen least recently is forgotten first (default
    /// 10000).
    pub tracked_names: usize,
}

impl Default for LoginLimits {
    fn default() -> Self {
        Self {
            max_failures: 5,
            window: Duration::from_secs(900),
            lockout: Duration::from_secs(60),
            max_lockout: Duration::from_secs(900),
            address_max_failures: 20,
            global_max_failures: 100,
            global_window: Duration::from_secs(60),
            tracked_names: 10_000,
        }
    }
}

/// How much password hashing may run at once (`AUTH_HASH_CONCURRENCY`,
/// `AUTH_HASH_QUEUE_MS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashLimits {
    /// `AUTH_HASH_CONCURRENCY`: hashes computed at once (default half the
    /// CPUs, at least 1, so that hashing leaves cores to the other routes).
    pub concurrency: usize,
    /// `AUTH_HASH_QUEUE_MS`: how long a login waits for a free slot before
    /// it is answered 503 with `Retry-After` (default 1000).
    pub queue_timeout: Duration,
}

impl Default for HashLimits {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
        Self {
            concurrency: (cpus / 2).max(1),
            queue_timeout: Duration::from_millis(1000),
        }
    }
}

/// The service's own settings (`AUTH_*`); see [`Settings::read`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Settings {
    /// `AUTH_ISSUER`: the `iss` of every token, an `http://` or `https://`
    /// URL. The OpenID discovery document is served at
    /// `/auth/v1/.well-known/openid-configuration`, so set it to
    /// `<origin>/auth/v1` for discovery from the issuer to work.
    pub issuer: String,
    /// `AUTH_DEFAULT_AUDIENCE` (formerly `AUTH_AUDIENCE`): the `aud` of a
    /// token asked for without an `audience` parameter; always one of the
    /// known audiences.
    pub default_audience: String,
    /// `AUTH_AUDIENCES`: the audiences a token may be asked for (the
    /// services), besides the default one.
    pub audiences: Vec<String>,
    /// `AUTH_TOKEN_TTL_SECS`: access-token lifetime, and how long a retired
    /// key stays published.
    pub token_ttl: Duration,
    /// `AUTH_REFRESH_TTL_SECS`: refresh-token lifetime.
    pub refresh_ttl: Duration,
    /// `AUTH_KEY_ROTATE_SECS`: how long a signing key stays current.
    pub key_rotate: Duration,
    /// `AUTH_KEY_CHECK_SECS`: how often rotation and key expiry are checked.
    pub key_check: Duration,
    /// `AUTH_SEED_DEMO`: apply the demo users and clients ([`DEMO_GRANTS`],
    /// with their well-known passwords) with the grants file, whose entries
    /// win. Off unless asked for.
    pub seed_demo: bool,
    /// `AUTH_GRANTS_FILE`: the grants file (TOML) declaring users, clients
    /// and their grants; see the [crate docs](crate#permissions-as-data).
    pub grants_file: Option<PathBuf>,
    /// `AUTH_GRANTS_POLL_SECS`: how often the grants file is looked at for
    /// a change.
    pub grants_poll: Duration,
    /// `AUTH_HASH_MEMORY_KIB`, `AUTH_HASH_ITERATIONS`: the cost of new
    /// password hashes.
    pub hash_cost: HashCost,
    /// `AUTH_HASH_CONCURRENCY`, `AUTH_HASH_QUEUE_MS`: how much hashing runs
    /// at once.
    pub hash_limits: HashLimits,
    /// `AUTH_LOGIN_*`: brute-force protection of the token endpoint.
    pub login: LoginLimits,
    /// `AUTH_PUBLIC_URL`: the base URL at which this service reaches its own
    /// API, to fetch its key set when verifying tokens on its protected
    /// route. `None`: [`run`] uses the address it listens on, [`app`]
    /// `http://127.0.0.1:8081`.
    pub public_url: Option<String>,
    /// Whether [`app`] gives the service a verifier over its own key set:
    /// true unless `CHASSIS_AUTH_ISSUER` is set, in which case the chassis'
    /// verifier from `CHASSIS_AUTH_*` checks the tokens of the protected
    /// route.
    pub verify_own_tokens: bool,
    /// `AUTH_DATABASE_URL`, `AUTH_DATA_DIR` and `AUTH_DB_*`: the Postgres
    /// database, or the SQLite file `auth.db`.
    pub db: DbConfig,
}

/// An absolute `http://host[:port]` URL, without a path.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BaseUrl(String);

impl std::str::FromStr for BaseUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let trimmed = s.trim_end_matches('/');
        let uri: http::Uri = trimmed.parse().map_err(|_| "not a URL".to_owned())?;
        if uri.scheme_str() != Some("http")
            || uri.authority().is_none()
            || !matches!(uri.path(), "" | "/")
            || uri.query().is_some()
        {
            return Err("expected an absolute http:// URL without a path".to_owned());
        }
        Ok(Self(trimmed.to_owned()))
    }
}

/// Whole seconds from 1 to a maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Secs<const MAX: u64>(u64);

impl<const MAX: u64> std::str::FromStr for Secs<MAX> {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.parse::<u64>() {
            Ok(0) => Err("must be at least 1 second".to_owned()),
            Ok(n) if n > MAX => Err(format!("at most {MAX} seconds")),
            Ok(n) => Ok(Self(n)),
            Err(e) => Err(format!("expected whole seconds: {e}")),
        }
    }
}

/// Ten years, the longest refresh or rotation period accepted.
const TEN_YEARS: u64 = 10 * 365 * 86_400;

/// Whole milliseconds from 1 to 60 000.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Millis(u64);

impl std::str::FromStr for Millis {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.parse::<u64>() {
            Ok(n @ 1..=60_000) => Ok(Self(n)),
            Ok(_) => Err("must be from 1 to 60000 milliseconds".to_owned()),
            Err(e) => Err(format!("expected whole milliseconds: {e}")),
        }
    }
}

/// What an audience may look like: an account segment of a permission, so
/// that a client's right to exchange tokens for it is a grant
/// (`auth:<audience>:exchange:token`).
const AUDIENCE_GRAMMAR: &str = "audiences are 1 to 64 characters of [A-Za-z0-9_-]";

/// Reads `AUTH_LOGIN_*`.
fn read_login_limits(r: &mut Reader<'_>) -> LoginLimits {
    let d = LoginLimits::default();
    let count = |r: &mut Reader<'_>, name: &str, default: u32, what: &str| {
        let n: u32 = r.optional(name, default, what);
        if !(1..=1_000_000).contains(&n) {
            r.problem(name, "must be from 1 to 1000000");
        }
        n
    };
    let max_failures = count(
        r,
        "AUTH_LOGIN_MAX_FAILURES",
        d.max_failures,
        "failed logins of one name before it is locked",
    );
    let address_max_failures = count(
        r,
        "AUTH_LOGIN_ADDRESS_MAX_FAILURES",
        d.address_max_failures,
        "failed logins from one client address before it is locked",
    );
    let global_max_failures = count(
        r,
        "AUTH_LOGIN_GLOBAL_MAX_FAILURES",
        d.global_max_failures,
        "failed logins of all names per global window",
    );
    let tracked_names = count(
        r,
        "AUTH_LOGIN_TRACKED_NAMES",
        u32::try_from(d.tracked_names).unwrap_or(u32::MAX),
        "most names (and addresses) whose failed logins are remembered",
    );
    let mut secs = |name: &str, default: Duration, what: &str| {
        Duration::from_secs(r.optional(name, Secs::<86_400>(default.as_secs()), what).0)
    };
    let window = secs(
        "AUTH_LOGIN_WINDOW_SECS",
        d.window,
        "seconds failed logins are remembered after the last one",
    );
    let lockout = secs(
        "AUTH_LOGIN_LOCKOUT_SECS",
        d.lockout,
        "seconds of the first lock of a name",
    );
    let max_lockout = secs(
        "AUTH_LOGIN_MAX_LOCKOUT_SECS",
        d.max_lockout,
        "seconds of the longest lock of a name",
    );
    let global_window = secs(
        "AUTH_LOGIN_GLOBAL_WINDOW_SECS",
        d.global_window,
        "seconds of the window of the global failure budget",
    );
    LoginLimits {
        max_failures,
        window,
        lockout,
        max_lockout: max_lockout.max(lockout),
        address_max_failures,
        global_max_failures,
        global_window,
        tracked_names: tracked_names as usize,
    }
}

impl Settings {
    /// Reads the `AUTH_*` settings, recording problems in `r`:
    ///
    /// | variable | default |
    /// |---|---|
    /// | `AUTH_ISSUER` | `http://127.0.0.1:8081` (an `http(s)://` URL) |
    /// | `AUTH_DEFAULT_AUDIENCE` (or its former name `AUTH_AUDIENCE`) | `chassis-demo` |
    /// | `AUTH_AUDIENCES` | `auth,ticketing,orders,mail` |
    /// | `AUTH_TOKEN_TTL_SECS` | `900` (at most 86400) |
    /// | `AUTH_REFRESH_TTL_SECS` | `86400` |
    /// | `AUTH_KEY_ROTATE_SECS` | `2592000` (30 days) |
    /// | `AUTH_KEY_CHECK_SECS` | `60` |
    /// | `AUTH_SEED_DEMO` | `false` |
    /// | `AUTH_GRANTS_FILE` | none (a TOML file; its problems are listed too) |
    /// | `AUTH_GRANTS_POLL_SECS` | `5` |
    /// | `AUTH_HASH_MEMORY_KIB`, `AUTH_HASH_ITERATIONS` | `19456`, `2` |
    /// | `AUTH_HASH_CONCURRENCY` | half the CPUs, at least 1 |
    /// | `AUTH_HASH_QUEUE_MS` | `1000` |
    /// | `AUTH_LOGIN_MAX_FAILURES`, `AUTH_LOGIN_WINDOW_SECS` | `5`, `900` |
    /// | `AUTH_LOGIN_LOCKOUT_SECS`, `AUTH_LOGIN_MAX_LOCKOUT_SECS` | `60`, `900` |
    /// | `AUTH_LOGIN_ADDRESS_MAX_FAILURES` | `20` |
    /// | `AUTH_LOGIN_GLOBAL_MAX_FAILURES`, `AUTH_LOGIN_GLOBAL_WINDOW_SECS` | `100`, `60` |
    /// | `AUTH_LOGIN_TRACKED_NAMES` | `10000` |
    /// | `AUTH_PUBLIC_URL` | the address it listens on |
    /// | `AUTH_DATABASE_URL` | unset: SQLite in `AUTH_DATA_DIR`; a `postgres://` URL for several instances |
    /// | `AUTH_DATA_DIR` | `./data/auth` |
    /// | `AUTH_DB_POOL_SIZE`, `AUTH_DB_ACQUIRE_TIMEOUT_MS` | `4`, `5000` |
    pub fn read(r: &mut Reader<'_>) -> Self {
        let issuer: String = r.optional(
            "AUTH_ISSUER",
            "http://127.0.0.1:8081".to_owned(),
            "the iss of issued tokens",
        );
        if let Err(e) = discovery::origin(&issuer) {
            r.problem("AUTH_ISSUER", e);
        }
        let former: Option<String> =
            r.maybe("AUTH_AUDIENCE", "former name of AUTH_DEFAULT_AUDIENCE");
        let default_audience: String = r.optional(
            "AUTH_DEFAULT_AUDIENCE",
            former.unwrap_or_else(|| "chassis-demo".to_owned()),
            "the aud of tokens asked for without an audience",
        );
        if !chassis::permission::is_account(&default_audience) {
            r.problem("AUTH_DEFAULT_AUDIENCE", AUDIENCE_GRAMMAR);
        }
        let listed: String = r.optional(
            "AUTH_AUDIENCES",
            "auth,ticketing,orders,mail".to_owned(),
            "comma list of the audiences a token may be asked for",
        );
        let mut audiences: Vec<String> = Vec::new();
        for a in listed.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            if !chassis::permission::is_account(a) {
                r.problem("AUTH_AUDIENCES", AUDIENCE_GRAMMAR);
                break;
            }
            if !audiences.iter().any(|known| known == a) {
                audiences.push(a.to_owned());
            }
        }
        let token_ttl = r.optional(
            "AUTH_TOKEN_TTL_SECS",
            Secs::<MAX_TOKEN_TTL_SECS>(900),
            "access-token lifetime in seconds",
        );
        let refresh_ttl = r.optional(
            "AUTH_REFRESH_TTL_SECS",
            Secs::<TEN_YEARS>(86_400),
            "refresh-token lifetime in seconds",
        );
        let key_rotate = r.optional(
            "AUTH_KEY_ROTATE_SECS",
            Secs::<TEN_YEARS>(2_592_000),
            "seconds a signing key stays current",
        );
        let key_check = r.optional(
            "AUTH_KEY_CHECK_SECS",
            Secs::<86_400>(60),
            "seconds between checks of key rotation and expiry",
        );
        let seed_demo = r.optional(
            "AUTH_SEED_DEMO",
            false,
            "apply the demo users and clients too (true or false)",
        );
        let grants_file: Option<PathBuf> = r.maybe(
            "AUTH_GRANTS_FILE",
            "TOML file declaring the users, clients and their grants",
        );
        let grants_poll = r.optional(
            "AUTH_GRANTS_POLL_SECS",
            Secs::<3600>(5),
            "seconds between looks at the grants file for a change",
        );
        // Every problem of the grants, with the other settings' problems.
        let sources = grants::Sources {
            demo: seed_demo,
            file: grants_file.clone(),
        };
        let problems = sources.check_now(&mut |name| {
            r.maybe_secret(name, "a secret named by secret_env in the grants file")
        });
        for problem in problems {
            let name = if grants_file.is_some() {
                "AUTH_GRANTS_FILE"
            } else {
                "AUTH_SEED_DEMO"
            };
            r.problem(name, problem);
        }
        let d = HashCost::default();
        let memory_kib: u32 = r.optional(
            "AUTH_HASH_MEMORY_KIB",
            d.memory_kib,
            "argon2id memory per hash, KiB",
        );
        if !(64..=1024 * 1024).contains(&memory_kib) {
            r.problem("AUTH_HASH_MEMORY_KIB", "must be from 64 to 1048576");
        }
        let iterations: u32 = r.optional(
            "AUTH_HASH_ITERATIONS",
            d.iterations,
            "argon2id passes over the memory",
        );
        if !(1..=16).contains(&iterations) {
            r.problem("AUTH_HASH_ITERATIONS", "must be from 1 to 16");
        }
        let dh = HashLimits::default();
        let concurrency: usize = r.optional(
            "AUTH_HASH_CONCURRENCY",
            dh.concurrency,
            "password hashes computed at once",
        );
        if !(1..=1024).contains(&concurrency) {
            r.problem("AUTH_HASH_CONCURRENCY", "must be from 1 to 1024");
        }
        let queue_ms = r.optional(
            "AUTH_HASH_QUEUE_MS",
            Millis(1000),
            "milliseconds a login waits for a free hashing slot",
        );
        let login = read_login_limits(r);
        let public_url: Option<BaseUrl> = r.maybe(
            "AUTH_PUBLIC_URL",
            "base URL where the service reaches itself, e.g. http://127.0.0.1:8081",
        );
        let db = DbConfig::read(r, "AUTH", NAME);
        // Read again here (the chassis reads it too) only to know whether
        // the chassis' own verifier is configured.
        let chassis_issuer: Option<String> = r.maybe("CHASSIS_AUTH_ISSUER", "trusted token issuer");
        Self {
            issuer,
            default_audience,
            audiences,
            token_ttl: Duration::from_secs(token_ttl.0),
            refresh_ttl: Duration::from_secs(refresh_ttl.0),
            key_rotate: Duration::from_secs(key_rotate.0),
            key_check: Duration::from_secs(key_check.0),
            seed_demo,
            grants_file,
            grants_poll: Duration::from_secs(grants_poll.0),
            hash_cost: HashCost {
                memory_kib,
                iterations,
            },
            hash_limits: HashLimits {
                concurrency,
                queue_timeout: Duration::from_millis(queue_ms.0),
            },
            login,
            public_url: public_url.map(|u| u.0),
            verify_own_tokens: chassis_issuer.is_none(),
            db,
        }
    }

    /// The settings with every default and the database in `data_dir`:
    /// a starting point for tests and tools.
    pub fn with_data_dir(data_dir: impl Into<PathBuf>) -> Self {
        let env = chassis::config::Env::from_pairs::<&str, &str>([]);
        let mut r = Reader::new(&env);
        let mut settings = Self::read(&mut r);
        settings.db = DbConfig::new(data_dir.into(), "auth.db");
        settings
    }
}

/// What the handlers share.
struct AuthState {
    db: Database,
    keys: Arc<keys::Keys>,
    hasher: password::Hasher,
    issuer: String,
    default_audience: String,
    /// Every audience a token may be for, the default one included.
    audiences: Vec<String>,
    token_ttl: u64,
    refresh_ttl: u64,
    /// The time of tokens, refresh tokens and the throttle.
    clock: Arc<dyn Clock>,
    throttle: throttle::Throttle,
    discovery: client::OpenIdConfiguration,
}

impl std::fmt::Debug for AuthState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthState")
            .field("issuer", &self.issuer)
            .field("default_audience", &self.default_audience)
            .field("audiences", &self.audiences)
            .finish_non_exhaustive()
    }
}

/// The service: opens and migrates the database, applies the grants (the
/// grants file, and the demo's with [`Settings::seed_demo`]), makes sure a
/// signing key is current, and returns the builder with the API (the admin
/// API of grants included), the database readiness check, the key-rotation
/// task, with a grants file its watcher and the `grants-file` check, and
/// (unless [`Settings::verify_own_tokens`] is off) a verifier over its own
/// key set.
///
/// # Errors
///
/// When the grants have problems ([`AppError::Grants`], each listed), the
/// database cannot be opened, migrated or read, or a key cannot be made.
pub async fn app(settings: Settings) -> Result<ServiceBuilder, AppError> {
    app_with_clock(settings, SystemClock).await
}

/// [`app`] with `clock` as the time of issued tokens, refresh tokens and
/// the login throttle (key rotation keeps the system clock): tests move it
/// by hand instead of waiting.
///
/// # Errors
///
/// As [`app`].
pub async fn app_with_clock(
    settings: Settings,
    clock: impl Clock,
) -> Result<ServiceBuilder, AppError> {
    let clock: Arc<dyn Clock> = Arc::new(clock);
    // The recorder the service will export (installed once per process), so
    // that the description below is not lost.
    let _ = chassis::metrics::install_recorder();
    metrics::describe_counter!(
        token::FAILED_LOGINS,
        "Logins refused: a wrong password, an unknown user, or a client that failed authentication"
    );
    metrics::describe_counter!(
        token::THROTTLED_LOGINS,
        "Login attempts answered 429 without a password check, by the limit that refused them"
    );
    metrics::describe_counter!(
        grants::REJECTED,
        "Changes of the grants file refused for their problems; the grants last applied stay in force"
    );
    metrics::describe_counter!(
        token::HASH_BUSY,
        "Login attempts answered 503 because every password hashing slot stayed busy"
    );
    let db = Database::open_migrated(
        &settings.db,
        Migrations::new(&SQLITE_MIGRATOR).postgres(&PG_MIGRATOR),
    )
    .await?;
    let params = argon2::Params::new(
        settings.hash_cost.memory_kib,
        settings.hash_cost.iterations,
        1,
        None,
    )
    .map_err(|e| AppError::Crypto(format!("argon2 parameters: {e}")))?;
    let hasher = password::Hasher::with_params(
        params,
        settings.hash_limits.concurrency,
        settings.hash_limits.queue_timeout,
    )
    .await?;
    let sources = grants::Sources {
        demo: settings.seed_demo,
        file: settings.grants_file.clone(),
    };
    let applied = grants::apply_at_start(&sources, &db, &hasher, token::now()).await?;
    let token_ttl = settings.token_ttl.as_secs();
    let (keys, checked) = keys::Keys::open(
        db.clone(),
        settings.key_rotate.as_secs(),
        token_ttl,
        token::now(),
    )
    .await?;
    log_check(&checked);
    let keys = Arc::new(keys);
    let mut audiences = vec![settings.default_audience.clone()];
    for a in &settings.audiences {
        if !audiences.contains(a) {
            audiences.push(a.clone());
        }
    }
    if !discovery::found_from_issuer(&settings.issuer) {
        tracing::warn!(
            issuer = %settings.issuer,
            "the discovery document is served at /auth/v1/.well-known/openid-configuration; \
             discovery from this issuer will not find it (set AUTH_ISSUER to <origin>/auth/v1)"
        );
    }
    let state = Arc::new(AuthState {
        db: db.clone(),
        keys: keys.clone(),
        hasher,
        issuer: settings.issuer.clone(),
        default_audience: settings.default_audience.clone(),
        audiences,
        token_ttl,
        refresh_ttl: settings.refresh_ttl.as_secs(),
        throttle: throttle::Throttle::new(settings.login, clock.clone()),
        clock,
        discovery: discovery::document(&settings.issuer),
    });
    let api = routes::api().with_state(state.clone());
    let interval = settings.key_check;
    let status = grants::Status::default();
    let watched = status.clone();
    let (grants_db, grants_hasher) = (state.db.clone(), state.hasher.clone());
    let poll = settings.grants_poll;
    let mut builder = ServiceBuilder::new(NAME, 1)
        .api(api)
        // The throttle counts failed logins per client address.
        .peer_addresses()
        .health_check("database", db.clone(), CheckOptions::default())
        .background("signing-keys", move |stop| {
            maintain(db, keys, interval, stop)
        })
        .build_info(chassis::build_info!());
    if sources.file.is_some() {
        builder = builder
            .health_check(
                "grants-file",
                check_fn(move || {
                    let status = status.clone();
                    async move { status.check() }
                }),
                CheckOptions::default()
                    .non_critical()
                    .interval(poll)
                    .thresholds(1, 1),
            )
            .background("grants-file", move |stop| {
                grants::watch(
                    sources,
                    grants_db,
                    grants_hasher,
                    watched,
                    applied,
                    poll,
                    stop,
                )
            });
    }
    if settings.verify_own_tokens {
        builder = builder.verifier(own_verifier(&settings)?);
    }
    Ok(builder)
}

/// A verifier trusting this service's own issuer, with keys from its own
/// key set, fetched over HTTP like any other service does. Fetching again
/// after an unknown `kid` is allowed after 1 s (instead of 30), since the
/// key set is local: a token signed right after a rotation is accepted
/// almost at once.
fn own_verifier(settings: &Settings) -> Result<Verifier, AppError> {
    let base = settings
        .public_url
        .as_deref()
        .unwrap_or("http://127.0.0.1:8081");
    let url = format!("{base}{}", client::JWKS_PATH);
    Ok(Verifier::builder()
        .jwks(&settings.issuer, &settings.default_audience, &url)
        .algorithms(&[Algorithm::EdDSA])
        .max_lifetime(Duration::from_secs(MAX_TOKEN_TTL_SECS))
        .jwks_options(JwksOptions {
            cooldown: Duration::from_secs(1),
            ..JwksOptions::default()
        })
        .build()?)
}

fn log_check(checked: &keys::Checked) {
    if let Some(retired) = &checked.retired {
        tracing::info!(kid = %checked.kid, retired = %retired, "signing key rotated");
    } else if checked.deleted == 0 {
        tracing::debug!(kid = %checked.kid, "signing key current");
    }
    if checked.deleted > 0 {
        tracing::info!(
            deleted = checked.deleted,
            "expired signing keys removed from the key set"
        );
    }
}

/// Rotates the signing key when due, removes expired keys and refresh
/// tokens, every `interval`; closes the database on shutdown.
async fn maintain(
    db: Database,
    keys: Arc<keys::Keys>,
    interval: Duration,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(interval) => {}
        }
        let now = token::now();
        match keys.check(now, false).await {
            Ok(checked) => log_check(&checked),
            Err(e) => tracing::error!(error = %e, "signing key check failed"),
        }
        match store::purge_expired(&db, now).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(deleted = n, "expired refresh tokens deleted"),
            Err(e) => tracing::error!(error = %e, "refresh token clean-up failed"),
        }
    }
    db.close().await;
}

/// The URL at which a service listening on `addr` reaches itself: the
/// loopback address when it listens on all addresses.
fn reachable(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

/// Everything `main` does after reading the configuration: sets up logging,
/// binds `CHASSIS_BIND`, builds the service ([`app`]) and serves until
/// SIGTERM or SIGINT.
///
/// It binds before building, unlike [`ServiceBuilder::run`], so that the
/// service knows the address it listens on (with `CHASSIS_BIND` on port 0,
/// too) and can fetch its own key set there when `AUTH_PUBLIC_URL` is not
/// set; and it sets up logging first, so that start-up (migrations, keys,
/// grants) is logged.
pub async fn run(config: Config, mut settings: Settings) -> ExitCode {
    let _telemetry = chassis::telemetry::init(NAME, &config);
    let listener = match tokio::net::TcpListener::bind(config.bind).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(address = %config.bind, error = %e, "cannot listen");
            eprintln!("cannot listen on {}: {e}", config.bind);
            return ExitCode::FAILURE;
        }
    };
    if settings.public_url.is_none()
        && let Ok(addr) = listener.local_addr()
    {
        settings.public_url = Some(reachable(addr));
    }
    settings.verify_own_tokens = config.auth.is_none();
    let builder = match app(settings).await {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let service = match builder.config(config).build() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the service");
            eprintln!("{e}");
            return ExitCode::from(chassis::service::EXIT_SOFTWARE);
        }
    };
    match service
        .serve_with(listener, chassis::shutdown::signal())
        .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "service stopped");
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chassis::config::Env;

    #[test]
    fn defaults_match_the_contract() {
        let s = Settings::with_data_dir("/tmp/x");
        assert_eq!(s.issuer, "http://127.0.0.1:8081");
        assert_eq!(s.default_audience, "chassis-demo");
        assert_eq!(s.audiences, ["auth", "ticketing", "orders", "mail"]);
        assert_eq!(s.token_ttl.as_secs(), 900);
        assert_eq!(s.refresh_ttl.as_secs(), 86_400);
        assert_eq!(s.key_rotate.as_secs(), 2_592_000);
        assert!(!s.seed_demo, "no well-known passwords unless asked for");
        assert_eq!(s.grants_file, None);
        assert_eq!(s.grants_poll.as_secs(), 5);
        assert_eq!(s.login, LoginLimits::default());
        assert_eq!(s.login.max_failures, 5);
        assert_eq!(s.login.window.as_secs(), 900);
        assert_eq!(s.login.address_max_failures, 20);
        let cpus = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
        assert_eq!(s.hash_limits.concurrency, (cpus / 2).max(1));
        assert_eq!(s.hash_limits.queue_timeout, Duration::from_secs(1));
        assert_eq!(s.db.path(), PathBuf::from("/tmp/x/auth.db"));

        let env = Env::from_pairs::<&str, &str>([]);
        let mut r = Reader::new(&env);
        let s = Settings::read(&mut r);
        r.finish().unwrap();
        assert_eq!(s.db.path(), PathBuf::from("data/auth/auth.db"));
        assert_eq!(s.public_url, None);
        assert!(s.verify_own_tokens);

        // With the chassis' verifier configured, it checks the tokens.
        let env = Env::from_pairs([("CHASSIS_AUTH_ISSUER", "http://127.0.0.1:8081")]);
        let mut r = Reader::new(&env);
        assert!(!Settings::read(&mut r).verify_own_tokens);
    }

    #[test]
    fn every_problem_is_listed_and_secrets_never_shown() {
        let env = Env::from_pairs([
            ("AUTH_TOKEN_TTL_SECS", "100000"),
            ("AUTH_REFRESH_TTL_SECS", "0"),
            ("AUTH_SEED_DEMO", "yes"),
            ("AUTH_PUBLIC_URL", "https://auth.example/x"),
            ("AUTH_GRANTS_POLL_SECS", "0"),
            ("AUTH_HASH_MEMORY_KIB", "8"),
            ("AUTH_DB_POOL_SIZE", "0"),
        ]);
        let mut r = Reader::new(&env);
        let _ = Settings::read(&mut r);
        let err = r.finish().unwrap_err();
        let names: Vec<_> = err.problems().iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "AUTH_TOKEN_TTL_SECS",
                "AUTH_REFRESH_TTL_SECS",
                "AUTH_SEED_DEMO",
                "AUTH_GRANTS_POLL_SECS",
                "AUTH_HASH_MEMORY_KIB",
                "AUTH_PUBLIC_URL",
                "AUTH_DB_POOL_SIZE",
            ]
        );

        let env = Env::from_pairs([("AUTH_PUBLIC_URL", "http://127.0.0.1:9999/")]);
        let mut r = Reader::new(&env);
        let s = Settings::read(&mut r);
        r.finish().unwrap();
        assert_eq!(s.public_url.as_deref(), Some("http://127.0.0.1:9999"));

        // The grants file's problems are configuration problems, each one
        // listed, and the secrets it names are never shown.
        let file = std::env::temp_dir().join(format!("auth-settings-{}.toml", std::process::id()));
        std::fs::write(
            &file,
            "[clients.a]\nsecret_env = \"A_SECRET\"\ngrants = [\"x\"]\n\n\
             [clients.b]\nsecret_env = \"B_SECRET\"\n",
        )
        .unwrap();
        let path = file.to_str().unwrap().to_owned();
        let env = Env::from_pairs([("AUTH_GRANTS_FILE", path.as_str()), ("A_SECRET", "hunter2")]);
        let mut r = Reader::new(&env);
        let _ = Settings::read(&mut r);
        let err = r.finish().unwrap_err();
        let _ = std::fs::remove_file(&file);
        let shown = err.to_string();
        assert_eq!(err.problems().len(), 2, "{shown}");
        assert!(err.problems().iter().all(|p| p.name == "AUTH_GRANTS_FILE"));
        assert!(
            shown.contains("client \"a\": grant \"x\" is not valid"),
            "{shown}"
        );
        assert!(
            shown.contains("B_SECRET of secret_env is not set"),
            "{shown}"
        );
        assert!(!shown.contains("hunter2"));
    }

    #[test]
    fn audiences_limits_and_the_seed_are_settings() {
        let env = Env::from_pairs([
            ("AUTH_ISSUER", "http://127.0.0.1:8081/auth/v1"),
            ("AUTH_AUDIENCE", "legacy"),
            ("AUTH_AUDIENCES", " ticketing, orders ,ticketing,"),
            ("AUTH_SEED_DEMO", "true"),
            ("AUTH_HASH_CONCURRENCY", "3"),
            ("AUTH_HASH_QUEUE_MS", "250"),
            ("AUTH_LOGIN_MAX_FAILURES", "10"),
            ("AUTH_LOGIN_WINDOW_SECS", "600"),
            ("AUTH_LOGIN_LOCKOUT_SECS", "30"),
            ("AUTH_LOGIN_MAX_LOCKOUT_SECS", "3600"),
            ("AUTH_LOGIN_ADDRESS_MAX_FAILURES", "40"),
            ("AUTH_LOGIN_GLOBAL_MAX_FAILURES", "1000"),
            ("AUTH_LOGIN_GLOBAL_WINDOW_SECS", "10"),
            ("AUTH_LOGIN_TRACKED_NAMES", "50"),
        ]);
        let mut r = Reader::new(&env);
        let s = Settings::read(&mut r);
        r.finish().unwrap();
        // The former name still sets the default audience.
        assert_eq!(s.default_audience, "legacy");
        assert_eq!(s.audiences, ["ticketing", "orders"]);
        assert!(s.seed_demo);
        assert_eq!(s.hash_limits.concurrency, 3);
        assert_eq!(s.hash_limits.queue_timeout, Duration::from_millis(250));
        assert_eq!(
            s.login,
            LoginLimits {
                max_failures: 10,
                window: Duration::from_secs(600),
                lockout: Duration::from_secs(30),
                max_lockout: Duration::from_secs(3600),
                address_max_failures: 40,
                global_max_failures: 1000,
                global_window: Duration::from_secs(10),
                tracked_names: 50,
            }
        );
        let env = Env::from_pairs([
            ("AUTH_AUDIENCE", "legacy"),
            ("AUTH_DEFAULT_AUDIENCE", "ticketing"),
        ]);
        let mut r = Reader::new(&env);
        assert_eq!(Settings::read(&mut r).default_audience, "ticketing");

        let env = Env::from_pairs([
            ("AUTH_ISSUER", "auth-service"),
            ("AUTH_DEFAULT_AUDIENCE", "https://api.example"),
            ("AUTH_AUDIENCES", "ticketing,a b"),
            ("AUTH_HASH_CONCURRENCY", "0"),
            ("AUTH_HASH_QUEUE_MS", "0"),
            ("AUTH_LOGIN_MAX_FAILURES", "0"),
            ("AUTH_LOGIN_ADDRESS_MAX_FAILURES", "0"),
            ("AUTH_LOGIN_LOCKOUT_SECS", "0"),
        ]);
        let mut r = Reader::new(&env);
        let _ = Settings::read(&mut r);
        let err = r.finish().unwrap_err();
        let names: Vec<_> = err.problems().iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "AUTH_ISSUER",
                "AUTH_DEFAULT_AUDIENCE",
                "AUTH_AUDIENCES",
                "AUTH_HASH_CONCURRENCY",
                "AUTH_HASH_QUEUE_MS",
                "AUTH_LOGIN_MAX_FAILURES",
                "AUTH_LOGIN_ADDRESS_MAX_FAILURES",
                "AUTH_LOGIN_LOCKOUT_SECS",
            ]
        );
    }

    #[test]
    fn services_reach_themselves_on_loopback() {
        assert_eq!(
            reachable("0.0.0.0:8081".parse().unwrap()),
            "http://127.0.0.1:8081"
        );
        assert_eq!(reachable("[::]:80".parse().unwrap()), "http://[::1]:80");
        assert_eq!(
            reachable("127.0.0.1:4000".parse().unwrap()),
            "http://127.0.0.1:4000"
        );
    }
}
