//! Typed settings from the environment.
//!
//! # The standard
//!
//! A service is configured through environment variables only (twelve-factor):
//! every setting has a name, a description, a type and, unless it is
//! required, a default. Chassis settings start with `CHASSIS_`; a service
//! names its own with its own prefix (`TICKETING_DATABASE_URL`). A service
//! that is misconfigured must not half-start: it stops before binding, with
//! **one** message that lists **every** problem (so a deploy is fixed in one
//! round, not one variable at a time) and exit code 78 (`EX_CONFIG`), which
//! supervisors can tell apart from a crash. Secrets (passwords, keys, tokens)
//! are held in [`Secret`], which never prints its value: not in `Debug`, not in
//! `Display`, not when serialized, not in a configuration error.
//!
//! # How the chassis does it
//!
//! A [`Reader`] reads from an [`Env`] (the process environment, or a map in
//! tests) and collects problems instead of stopping at the first one. Parsing
//! uses each type's [`FromStr`], so any type that parses from text is a
//! setting. The chassis' own settings are [`Config`]; a service reads its own
//! with the same reader so that one message covers both.
//!
//! No configuration crate gathers every error at once (serde-based loaders
//! such as `envy` stop at the first), which is the one behaviour this standard
//! requires, so the reader is written here; it is small.
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `CHASSIS_BIND` | `127.0.0.1:8080` | address to listen on |
//! | `CHASSIS_LOG` | `info` | log filter (`tracing` `EnvFilter` syntax) |
//! | `CHASSIS_LOG_FORMAT` | `json` | `json` (one event per line) or `pretty` |
//! | `CHASSIS_SHUTDOWN_GRACE_SECS` | `30` | how long in-flight requests may finish after SIGTERM |
//! | `CHASSIS_SHUTDOWN_DELAY_SECS` | `0` | how long readiness reports 503 before the listener closes |
//! | `CHASSIS_REQUEST_TIMEOUT_SECS` | `30` | longest time a request may take (504 after) |
//! | `CHASSIS_MAX_BODY_BYTES` | `1048576` | largest request body (413 above) |
//! | `CHASSIS_MAX_CONCURRENT_REQUESTS` | `1024` | requests in flight before shedding (503) |
//! | `CHASSIS_AUTH_*` | none | token verification, see [`AuthConfig`](crate::auth::AuthConfig) (feature `jwt`) |
//! | `CHASSIS_AUDIT_FILE` | none | append audit events to this file (default: the log) |
//! | `CHASSIS_AUDIT_QUEUE` | `8192` | audit events buffered before new ones are dropped (counted) |
//! | `CHASSIS_FAULT_*` | off | failure injection, see [`fault`](crate::fault) |
//! | `CHASSIS_TLS_CA_FILE` | none | PEM file of extra CAs trusted by outbound TLS, next to the platform's, see [`tls`](crate::tls) (feature `tls`) |
//! | `OTEL_*` | off | span export over OTLP: `OTEL_EXPORTER_OTLP_ENDPOINT`, the sampler, the resource; see [`otel`](crate::otel) (feature `otel`) |
//!
//! A setting of a part the chassis was built without is not ignored: with
//! the `jwt` feature off, every `CHASSIS_AUTH_*` variable set is a problem
//! that names the feature. A deployment that means to verify tokens then
//! never starts a service that would not. `CHASSIS_TLS_CA_FILE` and `OTEL_*`
//! are the exceptions: the one widens what outbound TLS trusts, and a build
//! without `tls` opens no outbound connection; the others ask for spans, a
//! build without `otel` records none; and platforms often set both for
//! every workload, so they are ignored there.
//!
//! # Example
//!
//! ```
//! use chassis::config::{Config, Env, Reader, Secret};
//!
//! struct Settings {
//!     database_url: String,
//!     pool_size: u32,
//!     api_key: Secret<String>,
//! }
//!
//! fn read(env: &Env) -> Result<(Config, Settings), chassis::config::ConfigError> {
//!     let mut r = Reader::new(env);
//!     let core = Config::read(&mut r);
//!     let database_url = r.required("TICKETING_DATABASE_URL", "SQLite URL of the ticket store");
//!     let pool_size = r.optional("TICKETING_POOL_SIZE", 5, "connections in the pool");
//!     let api_key = r.required_secret("TICKETING_API_KEY", "key for the payment provider");
//!     r.finish_with(|| Some((core, Settings { database_url: database_url?, pool_size, api_key: api_key? })))
//! }
//!
//! let env = Env::from_pairs([("CHASSIS_BIND", "nowhere"), ("TICKETING_POOL_SIZE", "many")]);
//! let err = read(&env).err().unwrap();
//! let text = err.to_string();
//! assert_eq!(err.problems().len(), 4);
//! assert!(text.contains("CHASSIS_BIND"));
//! assert!(text.contains("TICKETING_DATABASE_URL: required"));
//! assert!(text.contains("TICKETING_POOL_SIZE"));
//! assert!(text.contains("TICKETING_API_KEY"));
//!
//! let env = Env::from_pairs([
//!     ("TICKETING_DATABASE_URL", "sqlite://tickets.db"),
//!     ("TICKETING_API_KEY", "s3cr3t"),
//! ]);
//! let (core, settings) = read(&env).unwrap();
//! assert_eq!(core.bind.port(), 8080);
//! assert_eq!(settings.pool_size, 5);
//! assert_eq!(format!("{:?}", settings.api_key), "Secret([redacted])");
//! assert_eq!(settings.api_key.expose(), "s3cr3t");
//! ```

use std::{net::SocketAddr, str::FromStr, time::Duration};

pub use crate::env::{ConfigError, ConfigProblem, EXIT_CONFIG, Env, Reader, Secret};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One JSON object per line (the default; what log pipelines ingest).
    #[default]
    Json,
    /// Human-readable, coloured, several lines per event (for local work).
    Pretty,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "json" => Ok(Self::Json),
            "pretty" => Ok(Self::Pretty),
            _ => Err("expected `json` or `pretty`".to_owned()),
        }
    }
}

/// A positive whole number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Secs(u64);

impl FromStr for Secs {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.parse::<u64>() {
            Ok(n) if n <= 86_400 => Ok(Self(n)),
            Ok(_) => Err("more than a day (86400 seconds)".to_owned()),
            Err(e) => Err(format!("expected whole seconds: {e}")),
        }
    }
}

/// A log filter, checked with `tracing_subscriber::EnvFilter`'s parser.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Filter(String);

impl FromStr for Filter {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        tracing_subscriber::EnvFilter::builder()
            .parse(s)
            .map(|_| Self(s.to_owned()))
            .map_err(|e| e.to_string())
    }
}

/// The chassis' own settings (`CHASSIS_*`); the table is in the
/// [module docs](self).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Config {
    /// `CHASSIS_BIND`: the address to listen on.
    pub bind: SocketAddr,
    /// `CHASSIS_LOG`: the log filter.
    pub log: String,
    /// `CHASSIS_LOG_FORMAT`.
    pub log_format: LogFormat,
    /// `CHASSIS_SHUTDOWN_GRACE_SECS`: how long in-flight requests may finish.
    pub shutdown_grace: Duration,
    /// `CHASSIS_SHUTDOWN_DELAY_SECS`: how long readiness reports 503 before the
    /// listener stops accepting, so load balancers stop sending first.
    pub shutdown_delay: Duration,
    /// `CHASSIS_REQUEST_TIMEOUT_SECS`.
    pub request_timeout: Duration,
    /// `CHASSIS_MAX_BODY_BYTES`.
    pub max_body_bytes: usize,
    /// `CHASSIS_MAX_CONCURRENT_REQUESTS`.
    pub max_concurrent_requests: usize,
    /// `CHASSIS_AUTH_*`: token verification, when configured.
    #[cfg(feature = "jwt")]
    #[cfg_attr(docsrs, doc(cfg(feature = "jwt")))]
    pub auth: Option<crate::auth::AuthConfig>,
    /// `CHASSIS_AUDIT_FILE`: append audit events to this file instead of the log.
    pub audit_file: Option<std::path::PathBuf>,
    /// `CHASSIS_AUDIT_QUEUE`: audit events buffered before new ones are dropped.
    pub audit_queue: usize,
    /// `CHASSIS_FAULT_*`: failure injection, off unless configured.
    pub fault: Option<crate::fault::FaultConfig>,
    /// `CHASSIS_TLS_CA_FILE`: extra CAs trusted by outbound TLS, checked
    /// when read (see [`tls`](crate::tls)); without the `tls` feature,
    /// setting it is a problem.
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// `OTEL_*`: which spans are exported, where (see
    /// [`otel`](crate::otel)). Off unless an endpoint is set.
    #[cfg(feature = "otel")]
    #[cfg_attr(docsrs, doc(cfg(feature = "otel")))]
    pub tracing: crate::otel::TraceSettings,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            log: "info".to_owned(),
            log_format: LogFormat::Json,
            shutdown_grace: Duration::from_secs(30),
            shutdown_delay: Duration::ZERO,
            request_timeout: Duration::from_secs(30),
            max_body_bytes: 1024 * 1024,
            max_concurrent_requests: 1024,
            #[cfg(feature = "jwt")]
            auth: None,
            audit_file: None,
            audit_queue: crate::audit::DEFAULT_QUEUE,
            fault: None,
            tls_ca_file: None,
            #[cfg(feature = "otel")]
            tracing: crate::otel::TraceSettings::off(),
        }
    }
}

impl Config {
    /// Reads the `CHASSIS_*` settings, recording problems in `r`.
    pub fn read(r: &mut Reader<'_>) -> Self {
        let d = Self::default();
        let bind = r.optional(
            "CHASSIS_BIND",
            d.bind,
            "address to listen on, e.g. 0.0.0.0:8080",
        );
        let log = r.optional(
            "CHASSIS_LOG",
            Filter(d.log),
            "log filter, e.g. info,chassis=debug",
        );
        let log_format = r.optional("CHASSIS_LOG_FORMAT", d.log_format, "json or pretty");
        let grace = r.optional(
            "CHASSIS_SHUTDOWN_GRACE_SECS",
            Secs(30),
            "seconds in-flight requests may take to finish on shutdown",
        );
        let delay = r.optional(
            "CHASSIS_SHUTDOWN_DELAY_SECS",
            Secs(0),
            "seconds readiness reports 503 before the listener closes",
        );
        let timeout = r.optional(
            "CHASSIS_REQUEST_TIMEOUT_SECS",
            Secs(30),
            "longest time a request may take",
        );
        if timeout.0 == 0 {
            r.problem("CHASSIS_REQUEST_TIMEOUT_SECS", "must be at least 1 second");
        }
        let max_body_bytes = r.optional(
            "CHASSIS_MAX_BODY_BYTES",
            d.max_body_bytes,
            "largest request body in bytes",
        );
        let max_concurrent_requests = r.optional(
            "CHASSIS_MAX_CONCURRENT_REQUESTS",
            d.max_concurrent_requests,
            "requests in flight before new ones are shed",
        );
        if max_concurrent_requests == 0 {
            r.problem("CHASSIS_MAX_CONCURRENT_REQUESTS", "must be at least 1");
        }
        #[cfg(feature = "jwt")]
        let auth = crate::auth::AuthConfig::read(r);
        #[cfg(not(feature = "jwt"))]
        r.refuse_without_feature("CHASSIS_AUTH_", "jwt", "token verification");
        let fault = crate::fault::FaultConfig::read(r);
        let audit_file = r.maybe("CHASSIS_AUDIT_FILE", "file to append audit events to");
        let audit_queue = r.optional(
            "CHASSIS_AUDIT_QUEUE",
            d.audit_queue,
            "audit events buffered",
        );
        if audit_queue == 0 {
            r.problem("CHASSIS_AUDIT_QUEUE", "must be at least 1");
        }
        #[cfg(feature = "tls")]
        let tls_ca_file: Option<std::path::PathBuf> = {
            let path: Option<std::path::PathBuf> = r.maybe(
                crate::tls::CA_FILE_VAR,
                "PEM file of extra CAs trusted by outbound TLS",
            );
            if let Err(e) = crate::tls::ClientTls::from_ca_file(path.as_deref()) {
                r.problem(crate::tls::CA_FILE_VAR, e.to_string());
            }
            path
        };
        // Without outbound TLS there is nothing for extra CAs to widen.
        #[cfg(not(feature = "tls"))]
        let tls_ca_file = None;
        Self {
            bind,
            log: log.0,
            log_format,
            shutdown_grace: Duration::from_secs(grace.0),
            shutdown_delay: Duration::from_secs(delay.0),
            request_timeout: Duration::from_secs(timeout.0.max(1)),
            max_body_bytes,
            max_concurrent_requests: max_concurrent_requests.max(1),
            #[cfg(feature = "jwt")]
            auth,
            audit_file,
            audit_queue: audit_queue.max(1),
            fault,
            tls_ca_file,
            #[cfg(feature = "otel")]
            tracing: crate::otel::TraceSettings::read(r),
        }
    }

    /// Reads the `CHASSIS_*` settings from `env`.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let mut r = Reader::new(env);
        let config = Self::read(&mut r);
        r.finish().map(|()| config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::from_env(&Env::from_pairs::<&str, &str>([])).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.bind.to_string(), "127.0.0.1:8080");
        assert_eq!(c.max_body_bytes, 1_048_576);
        assert_eq!(c.max_concurrent_requests, 1024);
        assert_eq!(c.request_timeout, Duration::from_secs(30));
        assert_eq!(c.shutdown_grace, Duration::from_secs(30));
    }

    #[test]
    fn every_problem_is_listed_at_once() {
        let env = Env::from_pairs([
            ("CHASSIS_BIND", "localhost"),
            ("CHASSIS_LOG", "info,[[["),
            ("CHASSIS_LOG_FORMAT", "xml"),
            ("CHASSIS_SHUTDOWN_GRACE_SECS", "-1"),
            ("CHASSIS_REQUEST_TIMEOUT_SECS", "0"),
            ("CHASSIS_MAX_BODY_BYTES", "1MB"),
            ("CHASSIS_MAX_CONCURRENT_REQUESTS", "0"),
        ]);
        let err = Config::from_env(&env).unwrap_err();
        let names: Vec<_> = err.problems().iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "CHASSIS_BIND",
                "CHASSIS_LOG",
                "CHASSIS_LOG_FORMAT",
                "CHASSIS_SHUTDOWN_GRACE_SECS",
                "CHASSIS_REQUEST_TIMEOUT_SECS",
                "CHASSIS_MAX_BODY_BYTES",
                "CHASSIS_MAX_CONCURRENT_REQUESTS",
            ]
        );
        let text = err.to_string();
        assert!(
            text.starts_with("invalid configuration (7 problems):"),
            "{text}"
        );
        assert!(
            text.contains("`localhost`"),
            "non-secret values are shown: {text}"
        );
    }

    #[cfg(not(feature = "jwt"))]
    #[test]
    fn auth_settings_without_jwt_are_problems_naming_the_feature() {
        let env = Env::from_pairs([
            ("CHASSIS_AUTH_ISSUER", "https://auth.example"),
            ("CHASSIS_AUTH_AUDIENCE", "ticketing"),
            ("CHASSIS_AUTHX", "not ours"),
        ]);
        let err = Config::from_env(&env).unwrap_err();
        let names: Vec<_> = err.problems().iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["CHASSIS_AUTH_AUDIENCE", "CHASSIS_AUTH_ISSUER"]);
        for p in err.problems() {
            assert!(p.message.contains("`jwt` feature"), "{p}");
        }
        assert!(!err.to_string().contains("auth.example"), "{err}");
    }

    #[cfg(not(feature = "tls"))]
    #[test]
    fn a_ca_file_without_tls_is_ignored() {
        let env = Env::from_pairs([("CHASSIS_TLS_CA_FILE", "/nonexistent/extra.pem")]);
        let c = Config::from_env(&env).unwrap();
        assert_eq!(c.tls_ca_file, None);
    }

    #[cfg(feature = "tls")]
    #[test]
    fn an_unusable_ca_file_is_a_problem() {
        let dir = std::env::temp_dir().join(format!("chassis-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").unwrap();
        for (path, says) in [
            (dir.join("missing.pem"), "cannot read CA file"),
            (empty, "no certificate in the PEM"),
        ] {
            let env = Env::from_pairs([
                ("CHASSIS_TLS_CA_FILE", path.to_str().unwrap()),
                ("CHASSIS_BIND", "nowhere"),
            ]);
            let err = Config::from_env(&env).unwrap_err();
            let names: Vec<_> = err.problems().iter().map(|p| p.name.as_str()).collect();
            assert_eq!(
                names,
                ["CHASSIS_BIND", "CHASSIS_TLS_CA_FILE"],
                "listed together"
            );
            assert!(err.to_string().contains(says), "{err}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn secrets_never_print() {
        let env = Env::from_pairs([("KEY", "hunter2"), ("PORT", "hunter2")]);
        let mut r = Reader::new(&env);
        let key = r.required_secret("KEY", "a key").unwrap();
        let _: Option<Secret<u16>> = r.maybe("PORT", "a secret number");
        assert_eq!(format!("{key:?} {key}"), "Secret([redacted]) [redacted]");
        assert_eq!(serde_json::to_string(&key).unwrap(), "\"[redacted]\"");
        // A secret that fails to parse is reported without its value.
        let env = Env::from_pairs([("PIN", "hunter2")]);
        let mut r = Reader::new(&env);
        let _ = r.read::<Secret<u16>>("PIN", "a pin", true);
        let text = r.finish().unwrap_err().to_string();
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[test]
    fn required_and_empty_secrets_are_problems() {
        let env = Env::from_pairs([("EMPTY", "")]);
        let mut r = Reader::new(&env);
        assert!(r.required_secret("EMPTY", "x").is_none());
        assert!(r.required_secret("MISSING", "x").is_none());
        assert!(r.required::<u32>("ALSO_MISSING", "y").is_none());
        let err = r.finish().unwrap_err();
        assert_eq!(err.problems().len(), 3);
        assert_eq!(err.problems()[0].message, "required but empty (x)");
        assert_eq!(err.problems()[2].message, "required but not set (y)");
    }

    #[cfg(unix)]
    #[test]
    fn non_utf8_is_a_problem() {
        use std::os::unix::ffi::OsStringExt;
        let env = Env::from_pairs([("CHASSIS_BIND", OsString::from_vec(vec![0xff, 0xfe]))]);
        let err = Config::from_env(&env).unwrap_err();
        assert!(err.problems()[0].message.starts_with("not valid UTF-8"));
    }

    #[test]
    fn long_values_are_cut_and_escaped_in_messages() {
        let long = format!("{}\n{}", "a".repeat(10), "b".repeat(200));
        let env = Env::from_pairs([("CHASSIS_MAX_BODY_BYTES", long)]);
        let text = Config::from_env(&env).unwrap_err().to_string();
        assert!(text.contains("aaaaaaaaaa\\nbbb"), "{text}");
        assert!(!text.contains(&"b".repeat(100)));
        assert_eq!(text.lines().count(), 2);
    }
}
