//! Calls to other services: one client stack with a deadline, retries within
//! a budget, a circuit breaker, a bulkhead, identity and propagation.
//!
//! # The standard
//!
//! A remote call is not a local call. Every synchronous call a service makes
//! to another service goes through a [`Downstream`], which applies, without
//! a way to forget any of them:
//!
//! * **a timeout on every attempt and a deadline on the whole call**; the
//!   time the caller will still wait goes downstream in `x-timeout-ms`, so
//!   the downstream stops working for a caller that has given up (the
//!   chassis server side honours it), and the deadline a request arrived
//!   with bounds the calls made on its behalf;
//! * **retries only when safe** (idempotent methods, an `Idempotency-Key`,
//!   or a call marked [`retry_safe`](RequestBuilder::retry_safe)), with backoff and full jitter, honouring
//!   `Retry-After`, **within a budget** so retries cannot multiply the load
//!   on a failing downstream (see [`crate::retry`]);
//! * **a circuit breaker per downstream** so a sick downstream is not called
//!   at all for a while, and callers fail in microseconds instead of waiting
//!   for timeouts (see [`crate::circuit_breaker`]);
//! * **a bulkhead per downstream** so one slow downstream cannot take every
//!   connection, task and socket of the caller (see [`crate::bulkhead`]);
//! * **propagation**: the correlation id and W3C `traceparent` of the
//!   request being served go on every call;
//! * **identity, chosen at each call site**: [`Downstream::as_service`]
//!   presents the service's own token from a [`TokenSource`]
//!   (client-credentials grant, refreshed before expiry);
//!   [`Downstream::on_behalf_of`] acts for the caller, so the downstream
//!   checks the user's permissions: it forwards the caller's token, or, when
//!   the downstream has an **audience** of its own, trades it at the token
//!   endpoint for a token addressed to that downstream (RFC 8693 token
//!   exchange, cached until near expiry), so that no token is accepted by a
//!   service it was not minted for; [`Downstream::anonymous`] sends none;
//! * **TLS**: `https://` base URLs are verified against the platform's roots
//!   and `CHASSIS_TLS_CA_FILE`, HTTP/2 by ALPN (see [`crate::tls`]);
//! * **replicas**: a downstream may have several addresses, a list or a DNS
//!   name looked up again and again; each attempt goes to the less loaded
//!   of two, and an address that keeps failing is ejected for a while
//!   (see [several addresses](#several-addresses));
//! * **measurement**: `http_client_request_duration_seconds` with labels
//!   `service`, `downstream`, `http_request_method` and
//!   `http_response_status_code` (`error` when there is no answer), the
//!   breaker's and bulkhead's metrics named after the downstream, for a
//!   downstream with several addresses `http_client_endpoints` and
//!   `http_client_ejections_total` (see
//!   [several addresses](#several-addresses)), and a warning in the log for
//!   each failed call.
//!
//! The stack, outermost first:
//!
//! ```text
//! metrics → correlation + traceparent → identity → deadline → retry
//!   → circuit breaker → bulkhead → address choice (several addresses only)
//!   → per-attempt timeout (sets x-timeout-ms)
//!   → failure injection (off unless configured) → connection pool
//! ```
//!
//! The retry sits outside the breaker, so every attempt counts in the
//! breaker and an open breaker stops the retries; the bulkhead sits inside
//! the breaker, so a rejected call does not take a place; the per-attempt
//! timeout sits inside the bulkhead, so a place is freed when an attempt is
//! cut. Response bodies are read whole (up to a limit) inside the attempt,
//! so the timeout covers the body too; this client is for the JSON calls
//! between services, not for streaming.
//!
//! Errors are typed ([`ClientError`]): timeout, circuit open, bulkhead full,
//! connection failure, an HTTP error status with the downstream's problem
//! body, no token. A handler may return a `ClientError` as is: it becomes a
//! problem+json answer (503 with `Retry-After` when the downstream is known
//! to be unavailable or cannot be reached, 504 for a timeout, 502 otherwise)
//! that does not reveal the downstream's answer.
//!
//! A downstream that answers with `Deprecation` (RFC 9745: the version of
//! its API this client calls is deprecated, see
//! [`ApiVersion`](crate::service::ApiVersion)) is named in a warning, once
//! per [`Downstream`] for the life of the process, with its `Sunset` and
//! `Link` (where to move): the call itself succeeds as always.
//!
//! # Defaults
//!
//! Every setting can be set in code on the [`DownstreamBuilder`] and
//! overridden by the environment, with the downstream's name upper-cased
//! (`-` becomes `_`) in the variable: for `ticketing`,
//! `CHASSIS_DOWNSTREAM_TICKETING_TIMEOUT_MS`.
//!
//! | setting | variable suffix | default |
//! |---|---|---|
//! | base URL (`https://`, or `http://` on loopback or behind a TLS sidecar); a comma-separated list, or one `dns+https://name:port` (see [several addresses](#several-addresses)) | `URL` | given in code |
//! | audience of this downstream's tokens (service tokens ask for it; calls on behalf of a caller exchange the caller's token for it) | `AUDIENCE` | none: the token source's own audience, the caller's token forwarded |
//! | per-attempt timeout | `TIMEOUT_MS` | 2 000 ms |
//! | deadline of the whole call, retries included | `DEADLINE_MS` | 5 000 ms |
//! | attempts, the first included | `RETRY_MAX_ATTEMPTS` | 3 |
//! | first backoff (doubles, full jitter) | `RETRY_BACKOFF_MS` | 50 ms |
//! | longest backoff | `RETRY_BACKOFF_MAX_MS` | 1 000 ms |
//! | retries allowed, % of calls (over 10 s, plus 1/s) | `RETRY_BUDGET_PERCENT` | 20 |
//! | breaker window, last N calls | `BREAKER_WINDOW` | 100 |
//! | calls before rates are judged | `BREAKER_MINIMUM_CALLS` | 20 |
//! | failure rate that opens, % | `BREAKER_FAILURE_RATE` | 50 |
//! | slow-call duration (off when 0) | `BREAKER_SLOW_CALL_MS` | 0 |
//! | slow-call rate that opens, % | `BREAKER_SLOW_CALL_RATE` | 100 |
//! | time spent open | `BREAKER_WAIT_OPEN_MS` | 10 000 ms |
//! | probes when half-open | `BREAKER_HALF_OPEN_CALLS` | 1 |
//! | concurrent calls | `BULKHEAD_MAX` | 64 |
//! | calls waiting for a place | `BULKHEAD_QUEUE` | 0 (refuse at once) |
//! | longest wait for a place | `BULKHEAD_WAIT_MS` | 0 |
//! | largest response body | `MAX_RESPONSE_BYTES` | 4 MiB |
//! | idle connections kept per host | `POOL_MAX_IDLE` | 32 |
//! | idle connection lifetime | `POOL_IDLE_TIMEOUT_MS` | 90 000 ms |
//! | failure injection | `FAULT_DELAY_MS`, `FAULT_DELAY_PERCENT`, `FAULT_ABORT_PERCENT`, `FAULT_ABORT_STATUS` | off |
//! | failures in a row that eject an address | `OUTLIER_CONSECUTIVE_FAILURES` | 3 |
//! | first ejection of an address (doubles for each ejection in a row) | `OUTLIER_EJECT_MS` | 10 000 ms |
//! | longest ejection | `OUTLIER_EJECT_MAX_MS` | 300 000 ms |
//! | most addresses ejected at once, % (0: never) | `OUTLIER_MAX_EJECT_PERCENT` | 50 |
//! | interval between lookups of a `dns+` name | `DNS_REFRESH_MS` | 5 000 ms |
//!
//! A half-open probe may take at most the per-attempt timeout.
//!
//! # How to choose the numbers
//!
//! * **Per-attempt timeout**: a little above the downstream's p99.9 latency
//!   when healthy (measure it: `http_client_request_duration_seconds`), so
//!   that only calls that would have failed anyway are cut. Not the p50: a
//!   timeout below the tail turns slowness into errors and retries.
//! * **Deadline**: what the caller can afford to wait in all, and below the
//!   caller's own request timeout, so that an answer, even an error, gets
//!   back before the caller gives up. `attempts × timeout + backoffs` may
//!   exceed it: the deadline wins and the last attempt is shortened.
//! * **Attempts**: 2 or 3. More attempts only help against rare, independent
//!   failures, and the budget stops them in an outage anyway.
//! * **Bulkhead**: the downstream's healthy throughput times its p99 latency
//!   (Little's law), with head-room: 100 calls/s at 50 ms need 5 places;
//!   64 leaves plenty for most services while still capping a hang. A
//!   bounded queue only helps when bursts are short compared with the wait.
//! * **Breaker**: a window large enough that one unlucky call does not open
//!   it (100 calls, at least 20 judged), a 50 % failure rate, and an open
//!   time close to how long the downstream takes to recover (restart, fail
//!   over): 10 s by default.
//!
//! # Several addresses
//!
//! A downstream that runs as several replicas is still one downstream: one
//! name, one breaker, one bulkhead, one retry budget. Its `URL` says where
//! the replicas are, in one of two forms:
//!
//! * **a list**: base URLs separated by commas,
//!   `http://10.0.0.5:8080,http://10.0.0.6:8080`
//!   ([`DownstreamBuilder::base_urls`] in code). They must share the scheme
//!   and the path; an empty entry, a bad URL, mixed schemes, different paths
//!   and an address listed twice are each a problem of the configuration,
//!   all reported at once. Each address is sent as the `Host` of its calls
//!   and, with `https://`, its certificate is verified for that host.
//! * **a DNS name**: `dns+https://ticketing-headless.shop.svc:8443/api`.
//!   The name is looked up (the system's resolver, through
//!   `tokio::net::lookup_host`) at the first call and again every
//!   `DNS_REFRESH_MS` while calls are made: a call that finds the last
//!   lookup too old starts the next one in the background and goes on with
//!   the addresses it has, so only the first call waits for DNS, and no task
//!   runs for a downstream nobody calls. The calls go to the addresses, but
//!   `Host` and the certificate's expected name stay the DNS name. An
//!   address that stays in the answer keeps its load and its ejection; a
//!   lookup that fails or comes back empty keeps the addresses known (a DNS
//!   hiccup must not empty a healthy downstream; a lookup without an answer
//!   in 10 s counts as failed). This is the **Kubernetes
//!   headless-service convention**: a `Service` with `clusterIP: None` has
//!   a name that resolves to the ready pods' addresses, so that the caller,
//!   not kube-proxy, spreads the calls, and a pod that stops being ready
//!   leaves the answer within the DNS TTL (30 s by default in CoreDNS, which
//!   bounds how fresh a lookup can be whatever the interval). A single
//!   address through a normal `ClusterIP` service stays the plain form.
//!
//! **Choice.** Each attempt goes to the less loaded (fewer attempts in
//! flight from this process) of two addresses drawn at random among those
//! not ejected: the *power of two choices*, which avoids the herd that
//! "least loaded of all" makes and the blind spots of round robin, at the
//! cost of two loads read. A retry draws again, leaving out the address
//! the call's previous attempt went to whenever another is left, so that a
//! stopped replica costs the caller one failed attempt, not three. An
//! attempt that could not connect never reached the replica, so it is
//! retried on another address whatever the method, a `POST` without an
//! `Idempotency-Key` included ([`crate::retry::NotSent`]); with one
//! address such a call is not retried, as the same address would refuse
//! it again.
//!
//! **Ejection** (outlier detection, after Envoy's
//! `consecutive_gateway_failure`). An address whose attempts fail
//! `OUTLIER_CONSECUTIVE_FAILURES` times in a row is left out of the choice
//! for `OUTLIER_EJECT_MS`; each further ejection in a row doubles it, up to
//! `OUTLIER_EJECT_MAX_MS` (Envoy multiplies linearly; doubling reaches the
//! cap sooner for a replica that stays down). A failure is what says the
//! *address* is bad: the connection could not be made or broke, the
//! attempt timed out, or a 502, 503 or 504 came back; a 500 or a 4xx is an
//! answer (every replica would give it) and resets the count, as does any
//! other answer. Injected faults count for nothing. When its time is over,
//! the address comes back on probation: one more failure ejects it again,
//! for twice as long; once it has stayed healthy as long as it was last
//! out, the next ejection starts from the base time again. Never more than
//! `OUTLIER_MAX_EJECT_PERCENT` of the addresses are out at once (at least
//! one of two or more may always go, as in Envoy), so that a fault of the
//! whole downstream cannot eject every replica and leave none to call; if
//! all are out anyway (100 %), all are called rather than none. An address
//! alone is never ejected.
//!
//! **Breaker and bulkhead stay per downstream.** Ejection acts first and on
//! one replica: a stopped replica costs a failed attempt or a few, the
//! retry goes elsewhere, the call succeeds, and the breaker sees mostly
//! successes. The breaker opens only when the downstream *as a whole*
//! fails (every replica, or more of them than may be ejected), which is
//! when calling it at all is useless. The bulkhead caps the calls in flight
//! to the whole downstream, whatever the number of addresses: it protects
//! the caller (its tasks, sockets and memory), not one replica; the choice
//! by load is what keeps one replica from taking more than its share.
//! Every attempt, whichever its address, counts in the breaker and draws on
//! the one retry budget.
//!
//! **Measurement.** `http_client_endpoints` (gauge, labels `service`,
//! `downstream`, `state`: `healthy` or `ejected`) counts the addresses, set
//! when the addresses change, one is ejected, or one is found back at the
//! next call; `http_client_ejections_total` (counter, labels `service`,
//! `downstream`) counts ejections, each also a warning in the log naming
//! the address. [`Downstream::endpoints`] lists the addresses with their
//! state, e.g. for a status page. The client span of each attempt names
//! the address called.
//!
//! **Why not `tower::balance`.** tower's `p2c::Balance` holds its endpoints
//! as services discovered from a `Discover` stream and is not `Clone`: each
//! downstream would need a `Buffer` (a task and a channel hop per attempt)
//! in front of it, and an endpoint per address, each a client of its own,
//! where here one hyper-util pool already keeps connections per address.
//! It has no outlier ejection, and its choice happens in `poll_ready`,
//! before the request is seen, so a retry cannot avoid the address that
//! just failed. The choice here is one step that rewrites the attempt's
//! address (its URI's authority) and counts its outcome, for a few
//! uncontended locks and two small allocations per attempt.
//!
//! **One address costs nothing.** With one base URL the stack is built
//! without the address choice: no lock, no count, no allocation is added
//! to a call.
//!
//! ```
//! use chassis::client::Downstream;
//! use chassis::config::{Env, Reader};
//!
//! let env = Env::from_pairs([
//!     ("CHASSIS_DOWNSTREAM_TICKETING_URL", "http://127.0.0.1:8082,http://127.0.0.1:8092"),
//!     ("CHASSIS_DOWNSTREAM_TICKETING_OUTLIER_EJECT_MS", "5000"),
//! ]);
//! let mut r = Reader::new(&env);
//! let ticketing = Downstream::builder("ticketing", "http://127.0.0.1:8082").read(&mut r);
//! r.finish().unwrap();
//! let addresses: Vec<String> = ticketing.endpoints().into_iter().map(|e| e.address).collect();
//! assert_eq!(addresses, ["127.0.0.1:8082", "127.0.0.1:8092"]);
//! ```
//!
//! This module is the `client` feature (on by default), which enables
//! `tls`. A service that calls no other service can leave it out.
//!
//! # Example
//!
//! ```
//! use chassis::client::{CallContext, Downstream};
//! use chassis::config::Env;
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let env = Env::from_pairs([("CHASSIS_DOWNSTREAM_TICKETING_TIMEOUT_MS", "500")]);
//! let mut reader = chassis::config::Reader::new(&env);
//! let ticketing = Downstream::builder("ticketing", "http://127.0.0.1:9")
//!     .deadline(Duration::from_secs(2))
//!     .configure(&mut reader)
//!     .build()
//!     .unwrap();
//! reader.finish().unwrap();
//! assert_eq!(ticketing.settings().attempt_timeout, Duration::from_millis(500));
//!
//! // In a handler, `cx` is extracted from the request; here, a background job.
//! let cx = CallContext::background();
//! let err = ticketing
//!     .anonymous(&cx)
//!     .get("/ticketing/v1/acme/tickets/1")
//!     .send()
//!     .await
//!     .unwrap_err();
//! // Nothing listens on port 9.
//! assert!(matches!(err, chassis::client::ClientError::Connection { .. }));
//! # }
//! ```

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::extract::FromRequestParts;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, StatusCode, Uri, header, request::Parts};
use http_body_util::Full;
use tokio::time::Instant;
use tower::{ServiceExt, util::BoxCloneSyncService};

use crate::{
    BoxError,
    auth::Principal,
    bulkhead::Bulkhead,
    circuit_breaker::{self, CircuitBreaker},
    config::{ConfigError, ConfigProblem, Reader},
    correlation::{
        Correlation, CorrelationId, TRACEPARENT, TRACESTATE, TraceContext, X_CORRELATION_ID,
    },
    fault::{FaultConfig, Percent},
    protect::Deadline,
    retry::{IDEMPOTENCY_KEY, RetryBudget, RetryPolicy},
    tls::ClientTls,
};

mod balance;
mod driver;
mod error;
mod pages;
#[cfg(feature = "contract")]
pub(crate) mod record;
mod token;
mod transport;

pub use balance::{EndpointStatus, OutlierDetection};
pub use driver::{Api, Calls, DriverClient};
pub use error::{ClientError, RemoteProblem};
pub use pages::Pages;
#[cfg(feature = "contract")]
#[cfg_attr(docsrs, doc(cfg(feature = "contract")))]
pub use record::{RecordedCall, Recorder};
pub use token::{TokenError, TokenSource};

/// Settings of one downstream; see the [defaults](self#defaults).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Settings {
    /// Longest one attempt may take, the response body included.
    pub attempt_timeout: Duration,
    /// Longest the whole call may take, retries and backoff included.
    pub deadline: Duration,
    /// Attempts in all, the first included (1 disables retries).
    pub max_attempts: u32,
    /// First backoff; each retry doubles it, with full jitter.
    pub backoff: Duration,
    /// Longest backoff.
    pub backoff_max: Duration,
    /// Retries allowed as a share of calls, 0 to 1.
    pub retry_budget: f32,
    /// The circuit breaker's tuning.
    pub breaker: circuit_breaker::Config,
    /// Concurrent calls allowed.
    pub bulkhead_max: usize,
    /// Calls allowed to wait for a place.
    pub bulkhead_queue: usize,
    /// Longest wait for a place.
    pub bulkhead_wait: Duration,
    /// Largest response body read.
    pub max_response_bytes: usize,
    /// Idle connections kept per host.
    pub pool_max_idle: usize,
    /// How long an idle connection is kept.
    pub pool_idle_timeout: Duration,
    /// Failure injection, off when `None`.
    pub fault: Option<FaultConfig>,
    /// The audience of this downstream's tokens, when it has one of its
    /// own: service tokens are asked for it, and calls on behalf of a caller
    /// exchange the caller's token for one addressed to it.
    pub audience: Option<String>,
    /// When an address of a downstream with several is ejected.
    pub outlier: OutlierDetection,
    /// How often a `dns+` base URL's name is looked up again while calls
    /// are made.
    pub dns_refresh: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            attempt_timeout: Duration::from_secs(2),
            deadline: Duration::from_secs(5),
            max_attempts: 3,
            backoff: Duration::from_millis(50),
            backoff_max: Duration::from_secs(1),
            retry_budget: 0.2,
            breaker: circuit_breaker::Config::count(100)
                .minimum_calls(20)
                .failure_rate(0.5)
                .wait_in_open(Duration::from_secs(10)),
            bulkhead_max: 64,
            bulkhead_queue: 0,
            bulkhead_wait: Duration::ZERO,
            max_response_bytes: 4 * 1024 * 1024,
            pool_max_idle: 32,
            pool_idle_timeout: Duration::from_secs(90),
            fault: None,
            audience: None,
            outlier: OutlierDetection::default(),
            dns_refresh: Duration::from_secs(5),
        }
    }
}

/// A count that must be at least 1.
#[derive(Debug, Clone, Copy)]
struct AtLeastOne(usize);

impl std::str::FromStr for AtLeastOne {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.parse::<usize>() {
            Ok(n) if n >= 1 => Ok(Self(n)),
            _ => Err("expected a whole number of at least 1".to_owned()),
        }
    }
}

/// Builds a [`Downstream`]; see the [module docs](self).
#[derive(Debug)]
#[must_use]
pub struct DownstreamBuilder {
    name: String,
    base_url: String,
    settings: Settings,
    tokens: Option<TokenSource>,
    tls: Option<ClientTls>,
    resolver: Option<balance::Resolve>,
}

impl DownstreamBuilder {
    /// Calls go to any of `urls`, balanced, instead of the base URL given
    /// to [`Downstream::builder`]: several base URLs with the same scheme
    /// and path (see [several addresses](self#several-addresses)).
    ///
    /// ```
    /// use chassis::client::Downstream;
    ///
    /// let ticketing = Downstream::builder("ticketing", "http://127.0.0.1:8082")
    ///     .base_urls(["http://127.0.0.1:8082", "http://127.0.0.1:8083"])
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(ticketing.endpoints().len(), 2);
    /// ```
    pub fn base_urls<I>(mut self, urls: I) -> Self
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let mut list = String::new();
        for url in urls {
            if !list.is_empty() {
                list.push(',');
            }
            list.push_str(url.as_ref());
        }
        self.base_url = list;
        self
    }

    /// Sets when an address of a downstream with several is ejected.
    pub fn outlier_detection(mut self, outlier: OutlierDetection) -> Self {
        self.settings.outlier = outlier;
        self
    }

    /// Sets how often a `dns+` base URL's name is looked up again while
    /// calls are made.
    pub fn dns_refresh(mut self, every: Duration) -> Self {
        self.settings.dns_refresh = every;
        self
    }

    /// Looks `dns+` names up with `resolve` instead of the system's
    /// resolver.
    #[cfg(test)]
    fn resolver(mut self, resolve: balance::Resolve) -> Self {
        self.resolver = Some(resolve);
        self
    }

    /// Sets the per-attempt timeout.
    pub fn attempt_timeout(mut self, d: Duration) -> Self {
        self.settings.attempt_timeout = d;
        self
    }

    /// Sets the deadline of a whole call.
    pub fn deadline(mut self, d: Duration) -> Self {
        self.settings.deadline = d;
        self
    }

    /// Sets the number of attempts (1 disables retries).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.settings.max_attempts = n.max(1);
        self
    }

    /// Sets the backoff bounds.
    pub fn backoff(mut self, first: Duration, max: Duration) -> Self {
        self.settings.backoff = first;
        self.settings.backoff_max = max.max(first);
        self
    }

    /// Sets the share of calls that may be retried, 0 to 1.
    pub fn retry_budget(mut self, share: f32) -> Self {
        self.settings.retry_budget = share.clamp(0.0, 1.0);
        self
    }

    /// Sets the circuit breaker's tuning.
    pub fn breaker(mut self, config: circuit_breaker::Config) -> Self {
        self.settings.breaker = config;
        self
    }

    /// Sets the bulkhead: `max` concurrent calls, `queue` more waiting at
    /// most `wait` each.
    pub fn bulkhead(mut self, max: usize, queue: usize, wait: Duration) -> Self {
        self.settings.bulkhead_max = max.max(1);
        self.settings.bulkhead_queue = queue;
        self.settings.bulkhead_wait = wait;
        self
    }

    /// Sets the largest response body read.
    pub fn max_response_bytes(mut self, n: usize) -> Self {
        self.settings.max_response_bytes = n;
        self
    }

    /// Injects faults into calls to this downstream.
    pub fn fault(mut self, fault: FaultConfig) -> Self {
        self.settings.fault = Some(fault);
        self
    }

    /// The audience of this downstream's tokens: calls
    /// [`as_service`](Downstream::as_service) ask the token source for it,
    /// and calls [`on_behalf_of`](Downstream::on_behalf_of) a caller
    /// exchange the caller's token for one addressed to it
    /// ([`TokenSource::exchange`]).
    pub fn audience(mut self, audience: &str) -> Self {
        self.settings.audience = Some(audience.to_owned());
        self
    }

    /// Presents tokens from `tokens` on calls made
    /// [`as_service`](Downstream::as_service). Takes an `Option` too, as
    /// [`TokenSource::read`] gives it: with `None` the downstream has no
    /// identity of its own, and an `as_service` call fails without being
    /// sent.
    pub fn token_source(mut self, tokens: impl Into<Option<TokenSource>>) -> Self {
        self.tokens = tokens.into();
        self
    }

    /// The TLS settings of `https://` calls (default
    /// [`ClientTls::global`]: the platform's roots and
    /// `CHASSIS_TLS_CA_FILE`).
    pub fn tls(mut self, tls: ClientTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// The prefix of this downstream's variables,
    /// `CHASSIS_DOWNSTREAM_<NAME>_`.
    pub fn env_prefix(&self) -> String {
        env_prefix(&self.name)
    }

    /// Applies the overrides set in the environment (see the
    /// [defaults](self#defaults)); problems go to `r`, so that one message
    /// lists every problem of the service's configuration.
    pub fn configure(mut self, r: &mut Reader<'_>) -> Self {
        let p = self.env_prefix();
        let v = |s: &str| format!("{p}{s}");
        let s = &mut self.settings;
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        if let Some(url) = r.maybe::<String>(
            &v("URL"),
            "base URL of the downstream (a comma-separated list, or dns+http(s)://name:port)",
        ) {
            match parse_bases(&url) {
                Ok(_) => self.base_url = url,
                Err(problems) => {
                    for e in problems {
                        r.problem(&v("URL"), e);
                    }
                }
            }
        }
        s.attempt_timeout = Duration::from_millis(r.optional(
            &v("TIMEOUT_MS"),
            ms(s.attempt_timeout),
            "per-attempt timeout, ms",
        ));
        s.deadline = Duration::from_millis(r.optional(
            &v("DEADLINE_MS"),
            ms(s.deadline),
            "deadline of a call, ms",
        ));
        s.max_attempts = r
            .optional(
                &v("RETRY_MAX_ATTEMPTS"),
                AtLeastOne(s.max_attempts as usize),
                "attempts per call",
            )
            .0
            .min(u32::MAX as usize) as u32;
        s.backoff = Duration::from_millis(r.optional(
            &v("RETRY_BACKOFF_MS"),
            ms(s.backoff),
            "first retry backoff, ms",
        ));
        s.backoff_max = Duration::from_millis(r.optional(
            &v("RETRY_BACKOFF_MAX_MS"),
            ms(s.backoff_max),
            "longest retry backoff, ms",
        ));
        s.retry_budget =
            (r.optional(
                &v("RETRY_BUDGET_PERCENT"),
                Percent(f64::from(s.retry_budget) * 100.0),
                "retries allowed, % of calls",
            )
            .0 / 100.0) as f32;
        let b = &mut s.breaker;
        if let Some(AtLeastOne(n)) = r.maybe(&v("BREAKER_WINDOW"), "breaker window, calls") {
            b.window = circuit_breaker::Window::Count(n);
        }
        b.minimum_calls = r
            .optional(
                &v("BREAKER_MINIMUM_CALLS"),
                AtLeastOne(b.minimum_calls),
                "calls before the breaker judges",
            )
            .0;
        b.failure_rate =
            r.optional(
                &v("BREAKER_FAILURE_RATE"),
                Percent(b.failure_rate * 100.0),
                "failure rate that opens the breaker, %",
            )
            .0 / 100.0;
        let slow_ms = r.optional(
            &v("BREAKER_SLOW_CALL_MS"),
            b.slow_call.map_or(0, ms),
            "slow-call duration, ms (0: off)",
        );
        b.slow_call = (slow_ms > 0).then(|| Duration::from_millis(slow_ms));
        b.slow_call_rate =
            r.optional(
                &v("BREAKER_SLOW_CALL_RATE"),
                Percent(b.slow_call_rate * 100.0),
                "slow-call rate that opens the breaker, %",
            )
            .0 / 100.0;
        b.wait_in_open = Duration::from_millis(r.optional(
            &v("BREAKER_WAIT_OPEN_MS"),
            ms(b.wait_in_open),
            "time the breaker stays open, ms",
        ));
        b.half_open_calls = r
            .optional(
                &v("BREAKER_HALF_OPEN_CALLS"),
                AtLeastOne(b.half_open_calls),
                "probes when half-open",
            )
            .0;
        s.bulkhead_max = r
            .optional(
                &v("BULKHEAD_MAX"),
                AtLeastOne(s.bulkhead_max),
                "concurrent calls",
            )
            .0;
        s.bulkhead_queue = r.optional(
            &v("BULKHEAD_QUEUE"),
            s.bulkhead_queue,
            "calls waiting for a place",
        );
        s.bulkhead_wait = Duration::from_millis(r.optional(
            &v("BULKHEAD_WAIT_MS"),
            ms(s.bulkhead_wait),
            "longest wait for a place, ms",
        ));
        s.max_response_bytes = r.optional(
            &v("MAX_RESPONSE_BYTES"),
            s.max_response_bytes,
            "largest response body, bytes",
        );
        s.pool_max_idle = r.optional(
            &v("POOL_MAX_IDLE"),
            s.pool_max_idle,
            "idle connections kept per host",
        );
        s.pool_idle_timeout = Duration::from_millis(r.optional(
            &v("POOL_IDLE_TIMEOUT_MS"),
            ms(s.pool_idle_timeout),
            "idle connection lifetime, ms",
        ));
        if let Some(audience) =
            r.maybe::<String>(&v("AUDIENCE"), "audience of the downstream's tokens")
        {
            if audience.is_empty() {
                r.problem(&v("AUDIENCE"), "must not be empty");
            }
            s.audience = Some(audience);
        }
        let o = &mut s.outlier;
        o.consecutive_failures = r
            .optional(
                &v("OUTLIER_CONSECUTIVE_FAILURES"),
                AtLeastOne(o.consecutive_failures as usize),
                "failures in a row that eject an address",
            )
            .0
            .min(u32::MAX as usize) as u32;
        o.base_ejection = Duration::from_millis(r.optional(
            &v("OUTLIER_EJECT_MS"),
            ms(o.base_ejection),
            "first ejection of an address, ms",
        ));
        o.max_ejection = Duration::from_millis(r.optional(
            &v("OUTLIER_EJECT_MAX_MS"),
            ms(o.max_ejection),
            "longest ejection of an address, ms",
        ));
        o.max_ejected_percent = r
            .optional(
                &v("OUTLIER_MAX_EJECT_PERCENT"),
                Percent(o.max_ejected_percent),
                "largest share of addresses ejected at once, %",
            )
            .0;
        s.dns_refresh = Duration::from_millis(r.optional(
            &v("DNS_REFRESH_MS"),
            ms(s.dns_refresh),
            "interval between lookups of a dns+ base URL, ms",
        ));
        if let Some(fault) = FaultConfig::read_prefixed(r, &v("FAULT_"), false) {
            s.fault = Some(fault);
        }
        if s.attempt_timeout.is_zero() {
            r.problem(&v("TIMEOUT_MS"), "must be more than 0");
        }
        if s.deadline.is_zero() {
            r.problem(&v("DEADLINE_MS"), "must be more than 0");
        }
        if s.outlier.base_ejection.is_zero() {
            r.problem(&v("OUTLIER_EJECT_MS"), "must be more than 0");
        }
        if s.outlier.max_ejection < s.outlier.base_ejection {
            r.problem(
                &v("OUTLIER_EJECT_MAX_MS"),
                "must be at least the first ejection (OUTLIER_EJECT_MS)",
            );
        }
        if s.dns_refresh.is_zero() {
            r.problem(&v("DNS_REFRESH_MS"), "must be more than 0");
        }
        self
    }

    /// [`configure`](Self::configure) from `r`, then
    /// [`build`](Self::build), with every problem of either in `r`: what a
    /// service's `Settings::read` does for each downstream. Like every
    /// `read` of the chassis, it always gives a value, so that one pass
    /// lists every problem: when there was one, the reader fails
    /// ([`Reader::finish`]) and the downstream it gave (at
    /// `http://127.0.0.1`) is never called.
    ///
    /// ```
    /// use chassis::{client::{Downstream, TokenSource}, config::{Env, Reader}};
    ///
    /// let env = Env::from_pairs([("CHASSIS_DOWNSTREAM_TICKETING_URL", "http://127.0.0.1:8082")]);
    /// let mut r = Reader::new(&env);
    /// let tokens = TokenSource::read(&mut r);
    /// let ticketing = Downstream::builder("ticketing", "http://127.0.0.1:9")
    ///     .token_source(tokens)
    ///     .read(&mut r);
    /// r.finish().unwrap();
    /// # let _ = ticketing;
    /// ```
    pub fn read(self, r: &mut Reader<'_>) -> Downstream {
        let name = self.name.clone();
        self.configure(r).build().unwrap_or_else(|e| {
            for p in e.problems() {
                r.problem(&p.name, p.message.clone());
            }
            Downstream::builder(&name, "http://127.0.0.1")
                .build()
                .expect("a loopback base URL and the default timeouts are valid")
        })
    }

    /// Builds the downstream. Fails when a base URL is not an absolute
    /// `http://` or `https://` URL (or a `dns+` one), the base URLs of a
    /// list differ in scheme or path, or a timeout is zero.
    ///
    /// Build each downstream once, at start-up, and clone the
    /// [`Downstream`]: its breaker and bulkhead live for the whole process
    /// (see [`circuit_breaker`]), so building one per
    /// request would grow memory without bound, and would give every call a
    /// breaker of its own that never sees the others fail.
    pub fn build(self) -> Result<Downstream, ConfigError> {
        let mut problems = Vec::new();
        let mut problem = |message: String| {
            problems.push(ConfigProblem {
                name: format!("downstream {}", self.name),
                message,
            });
        };
        let base = parse_bases(&self.base_url)
            .map_err(|e| e.into_iter().for_each(&mut problem))
            .ok();
        if self.settings.attempt_timeout.is_zero() || self.settings.deadline.is_zero() {
            problem("timeouts must be more than 0".to_owned());
        }
        if self.settings.outlier.base_ejection.is_zero() || self.settings.dns_refresh.is_zero() {
            problem(
                "the ejection time and the DNS refresh interval must be more than 0".to_owned(),
            );
        }
        let (Some(base), true) = (base, problems.is_empty()) else {
            return Err(ConfigError::new(problems));
        };
        let Base {
            scheme,
            authority,
            prefix,
            targets,
        } = base;
        let s = &self.settings;
        let name: Arc<str> = self.name.as_str().into();
        let mut breaker_config = s.breaker;
        breaker_config.max_wait_in_half_open =
            breaker_config.max_wait_in_half_open.min(s.attempt_timeout);
        let breaker = CircuitBreaker::new(&name, breaker_config);
        let bulkhead =
            Bulkhead::with_queue(&name, s.bulkhead_max, s.bulkhead_queue, s.bulkhead_wait);
        let policy = RetryPolicy::new(RetryBudget::new(Duration::from_secs(10), 1, s.retry_budget))
            .max_attempts(s.max_attempts)
            .backoff(s.backoff, s.backoff_max);
        let tls = self.tls.unwrap_or_else(ClientTls::global);
        // Service tokens for this downstream's audience; the source as given
        // exchanges callers' tokens.
        let own_tokens = match (&self.tokens, &s.audience) {
            (Some(t), Some(audience)) => Some(t.for_audience(audience)),
            (t, None) => t.clone(),
            (None, Some(_)) => None,
        };
        let balancer = targets.map(|targets| {
            let targets = match targets {
                Several::List(list) => balance::Targets::List(list),
                Several::Dns { host, port } => balance::Targets::Dns {
                    host,
                    port,
                    host_header: HeaderValue::from_str(authority.as_str())
                        .expect("an authority is a valid header value"),
                    refresh: s.dns_refresh,
                    resolve: self
                        .resolver
                        .clone()
                        .unwrap_or_else(balance::system_resolver),
                },
            };
            balance::Balancer::new(&name, targets, s.outlier)
        });
        let stack = transport::stack(
            s,
            &name,
            &tls,
            policy,
            breaker.clone(),
            bulkhead.clone(),
            balancer.clone(),
        );
        Ok(Downstream {
            inner: Arc::new(Inner {
                name,
                scheme,
                authority,
                prefix,
                settings: self.settings,
                tokens: self.tokens,
                own_tokens,
                breaker,
                bulkhead,
                balancer,
                stack,
                deprecation_noticed: AtomicBool::new(false),
                #[cfg(feature = "contract")]
                recorder: std::sync::OnceLock::new(),
            }),
        })
    }
}

fn env_prefix(name: &str) -> String {
    let upper: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("CHASSIS_DOWNSTREAM_{upper}_")
}

/// The base URLs of a downstream: one scheme and path prefix, and the
/// addresses when there are several.
struct Base {
    scheme: http::uri::Scheme,
    /// The one address, the first of a list, or the `dns+` name and port.
    authority: http::uri::Authority,
    prefix: String,
    targets: Option<Several>,
}

enum Several {
    List(Vec<http::uri::Authority>),
    Dns { host: String, port: u16 },
}

/// Parses a base URL, a comma-separated list of them, or a
/// `dns+http(s)://` one, listing every problem.
fn parse_bases(urls: &str) -> Result<Base, Vec<String>> {
    let mut problems = Vec::new();
    let mut parsed = Vec::new();
    let mut dns = false;
    let entries: Vec<&str> = urls.split(',').map(str::trim).collect();
    for (n, entry) in entries.iter().enumerate() {
        if entry.is_empty() {
            problems.push(if entries.len() == 1 {
                "the base URL is empty".to_owned()
            } else {
                format!("entry {} of the list is empty", n + 1)
            });
            continue;
        }
        let (is_dns, url) = match entry.strip_prefix("dns+") {
            Some(rest) => (true, rest),
            None => (false, *entry),
        };
        dns |= is_dns;
        match parse_base(url) {
            Ok(base) => parsed.push(base),
            Err(e) => problems.push(e),
        }
    }
    if dns && entries.len() > 1 {
        problems.push(
            "a dns+ base URL stands for every address of its name: give it alone, not in a list"
                .to_owned(),
        );
    }
    if let Some((scheme, _, prefix)) = parsed.first() {
        for (other, authority, other_prefix) in &parsed[1..] {
            if other != scheme {
                problems.push(format!(
                    "the base URLs mix {scheme}:// and {other}:// ({authority}): give one scheme"
                ));
            }
            if other_prefix != prefix {
                problems.push(format!(
                    "the base URLs have different paths ({prefix:?} and {other_prefix:?}): give one"
                ));
            }
        }
        for (n, (_, authority, _)) in parsed.iter().enumerate() {
            if parsed[..n].iter().any(|(_, a, _)| a == authority) {
                problems.push(format!("{authority} is listed twice"));
            }
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let targets = if dns {
        let (scheme, authority, _) = &parsed[0];
        let port = authority
            .port_u16()
            .unwrap_or(if *scheme == http::uri::Scheme::HTTPS {
                443
            } else {
                80
            });
        let host = authority.host();
        // `[::1]` is looked up (and verified) as `::1`.
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        Some(Several::Dns {
            host: host.to_owned(),
            port,
        })
    } else if parsed.len() > 1 {
        Some(Several::List(
            parsed.iter().map(|(_, a, _)| a.clone()).collect(),
        ))
    } else {
        None
    };
    let (scheme, authority, prefix) = parsed.swap_remove(0);
    Ok(Base {
        scheme,
        authority,
        prefix,
        targets,
    })
}

/// Scheme, authority and path prefix (without a trailing `/`) of a base URL.
fn parse_base(url: &str) -> Result<(http::uri::Scheme, http::uri::Authority, String), String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("base URL {url:?} is not a URL: {e}"))?;
    let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
        return Err(format!(
            "base URL {url:?} must be absolute, e.g. http://host:port"
        ));
    };
    if scheme != &http::uri::Scheme::HTTP && scheme != &http::uri::Scheme::HTTPS {
        return Err(format!(
            "base URL {url:?}: the scheme must be https:// (or http:// for loopback and meshes that terminate TLS in a sidecar)"
        ));
    }
    if uri.query().is_some() {
        return Err(format!("base URL {url:?} must not have a query"));
    }
    Ok((
        scheme.clone(),
        authority.clone(),
        uri.path().trim_end_matches('/').to_owned(),
    ))
}

/// The response-side stack of a downstream.
type Stack = BoxCloneSyncService<Request<Full<Bytes>>, http::Response<Bytes>, BoxError>;

struct Inner {
    name: Arc<str>,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    prefix: String,
    settings: Settings,
    tokens: Option<TokenSource>,
    own_tokens: Option<TokenSource>,
    breaker: CircuitBreaker,
    bulkhead: Bulkhead,
    /// The addresses, when there are several (or a `dns+` name).
    balancer: Option<balance::Balancer>,
    stack: Stack,
    /// Whether an answer said the API called is deprecated (warned once).
    deprecation_noticed: AtomicBool,
    /// Where its calls are recorded, in a contract test.
    #[cfg(feature = "contract")]
    recorder: std::sync::OnceLock<Recorder>,
}

/// A client for one downstream service; see the [module docs](self).
///
/// Cheap to clone (an `Arc`): build one per downstream at start-up and share
/// it, so that all calls share its pool, breaker, bulkhead and budget.
#[derive(Clone)]
pub struct Downstream {
    inner: Arc<Inner>,
}

impl fmt::Debug for Downstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Downstream")
            .field("name", &self.inner.name)
            .field("authority", &self.inner.authority)
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

impl Downstream {
    /// A builder for the downstream called `name` (the `downstream` label of
    /// its metrics and the name in its variables) at `base_url`, e.g.
    /// `http://ticketing:8080`; paths given to calls are appended to it.
    pub fn builder(name: &str, base_url: &str) -> DownstreamBuilder {
        DownstreamBuilder {
            name: name.to_owned(),
            base_url: base_url.to_owned(),
            settings: Settings::default(),
            tokens: None,
            tls: None,
            resolver: None,
        }
    }

    /// The downstream's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    /// The breaker; register it as a non-critical readiness check
    /// (`health.check("ticketing", breaker).non_critical()`) to report it.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.inner.breaker
    }

    /// The bulkhead.
    pub fn bulkhead(&self) -> &Bulkhead {
        &self.inner.bulkhead
    }

    /// The addresses called and their state now: the one address of a
    /// single base URL, every address of a list, or those a `dns+` name
    /// resolved to at its last lookup (none before the first call). See
    /// [several addresses](self#several-addresses); attempts in flight are
    /// counted only when there are several.
    pub fn endpoints(&self) -> Vec<EndpointStatus> {
        match &self.inner.balancer {
            Some(balancer) => balancer.status(),
            None => vec![EndpointStatus {
                address: self.inner.authority.to_string(),
                ejected: false,
                in_flight: 0,
            }],
        }
    }

    /// Records every call made through this downstream and its clones
    /// from now on into `recorder` (see [`Recorder`]), for a contract test;
    /// `false` when it already records into another one (which it keeps).
    #[cfg(feature = "contract")]
    #[cfg_attr(docsrs, doc(cfg(feature = "contract")))]
    pub fn record_into(&self, recorder: &Recorder) -> bool {
        let kept = self.inner.recorder.get_or_init(|| recorder.clone());
        kept.same(recorder)
    }

    /// The recorder of its calls, if any.
    #[cfg(feature = "contract")]
    pub(crate) fn recorder(&self) -> Option<&Recorder> {
        self.inner.recorder.get()
    }

    /// Calls made with the service's own identity, from the
    /// [`TokenSource`] given to the builder.
    pub fn as_service<'a>(&'a self, cx: &'a CallContext) -> Caller<'a> {
        Caller {
            downstream: self,
            cx,
            identity: Identity::Service,
        }
    }

    /// Calls made on behalf of the caller of `cx`, forwarding its token: the
    /// downstream checks the caller's own permissions.
    pub fn on_behalf_of<'a>(&'a self, cx: &'a CallContext) -> Caller<'a> {
        Caller {
            downstream: self,
            cx,
            identity: Identity::Caller,
        }
    }

    /// Calls made without credentials, to public endpoints.
    pub fn anonymous<'a>(&'a self, cx: &'a CallContext) -> Caller<'a> {
        Caller {
            downstream: self,
            cx,
            identity: Identity::None,
        }
    }

    /// Warns, the first time only, that an answer said the API this client
    /// calls is deprecated (`Deprecation`), with its sunset and where to
    /// move.
    fn notice_deprecation(&self, headers: &http::HeaderMap) {
        let Some(deprecation) = headers.get("deprecation") else {
            return;
        };
        if self.inner.deprecation_noticed.swap(true, Ordering::Relaxed) {
            return;
        }
        let text = |v: Option<&HeaderValue>| {
            v.and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        let links: Vec<&str> = headers
            .get_all(header::LINK)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter(|l| l.contains("successor-version") || l.contains("\"deprecation\""))
            .collect();
        tracing::warn!(
            downstream = %self.inner.name,
            deprecation = %text(Some(deprecation)),
            sunset = %text(headers.get("sunset")),
            link = %links.join(", "),
            "the downstream's API version called is deprecated: move to its successor before its sunset"
        );
    }

    fn uri(&self, path_and_query: &str) -> Result<Uri, ClientError> {
        if !path_and_query.starts_with('/') {
            return Err(self.invalid(format!("path {path_and_query:?} must start with '/'")));
        }
        let full = format!("{}{path_and_query}", self.inner.prefix);
        let pq: http::uri::PathAndQuery = full
            .parse()
            .map_err(|e| self.invalid(format!("path {path_and_query:?}: {e}")))?;
        Uri::builder()
            .scheme(self.inner.scheme.clone())
            .authority(self.inner.authority.clone())
            .path_and_query(pq)
            .build()
            .map_err(|e| self.invalid(e.to_string()))
    }

    fn invalid(&self, message: String) -> ClientError {
        ClientError::InvalidRequest {
            downstream: self.inner.name.clone(),
            message,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Identity {
    Service,
    Caller,
    None,
}

/// What a call made while serving a request carries from it: the
/// correlation id and trace context, the caller (for
/// [`Downstream::on_behalf_of`]) and the caller's deadline (from its
/// `x-timeout-ms`).
///
/// Extract it in a handler; build one with [`CallContext::background`] or
/// [`CallContext::continuing`] for work that runs outside a request.
#[derive(Clone, Debug)]
pub struct CallContext {
    correlation: Correlation,
    principal: Option<Principal>,
    deadline: Option<Instant>,
}

impl CallContext {
    /// A new correlation id and trace, no caller and no deadline: for
    /// scheduled work.
    pub fn background() -> Self {
        Self::continuing(CorrelationId::generate())
    }

    /// Work continuing what the request with correlation id `id` started,
    /// e.g. an outbox relay delivering an event stored with that id.
    pub fn continuing(id: CorrelationId) -> Self {
        Self {
            // Nothing records a span for the work itself: each call's
            // attempts are the roots of the trace (see `with_trace`).
            correlation: Correlation::new(id, TraceContext::new_unrecorded_root()),
            principal: None,
            deadline: None,
        }
    }

    /// The context of a request, from its parts.
    pub fn from_parts(parts: &Parts) -> Self {
        Self {
            correlation: parts
                .extensions
                .get::<Correlation>()
                .cloned()
                .unwrap_or_else(|| {
                    Correlation::new(CorrelationId::generate(), TraceContext::new_root())
                }),
            principal: crate::context::authorized(&parts.extensions)
                .map(|(principal, _)| principal),
            deadline: parts.extensions.get::<Deadline>().map(|d| d.0),
        }
    }

    /// Calls made with this context continue `trace`: their attempts are
    /// child spans of it. For queued work, the span that does the work
    /// (see [`crate::otel::Span::consumer`]).
    #[must_use]
    pub fn with_trace(mut self, trace: TraceContext) -> Self {
        self.correlation = Correlation::new(self.correlation.id().clone(), trace);
        self
    }

    /// Sets the caller whose token [`Downstream::on_behalf_of`] forwards.
    #[must_use]
    pub fn with_principal(mut self, principal: Principal) -> Self {
        self.principal = Some(principal);
        self
    }

    /// Calls made with this context end by `deadline` at the latest.
    #[must_use]
    pub fn with_deadline(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// The correlation id and trace context.
    pub fn correlation(&self) -> &Correlation {
        &self.correlation
    }

    /// The caller, if the request was authenticated.
    pub fn principal(&self) -> Option<&Principal> {
        self.principal.as_ref()
    }

    /// The caller's deadline, if it sent one.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }
}

impl<S: Send + Sync> FromRequestParts<S> for CallContext {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self::from_parts(parts))
    }
}

/// Calls to one downstream with one identity and context; made by
/// [`Downstream::as_service`], [`Downstream::on_behalf_of`] and
/// [`Downstream::anonymous`].
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    downstream: &'a Downstream,
    cx: &'a CallContext,
    identity: Identity,
}

impl<'a> Caller<'a> {
    /// A `GET` of `path` (with its query), relative to the base URL.
    pub fn get(self, path: &str) -> RequestBuilder<'a> {
        self.request(Method::GET, path)
    }

    /// A `POST`.
    pub fn post(self, path: &str) -> RequestBuilder<'a> {
        self.request(Method::POST, path)
    }

    /// A `PUT`.
    pub fn put(self, path: &str) -> RequestBuilder<'a> {
        self.request(Method::PUT, path)
    }

    /// A `DELETE`.
    pub fn delete(self, path: &str) -> RequestBuilder<'a> {
        self.request(Method::DELETE, path)
    }

    /// A request with any method.
    pub fn request(self, method: Method, path: &str) -> RequestBuilder<'a> {
        RequestBuilder {
            caller: self,
            uri: self.downstream.uri(path),
            method,
            headers: http::HeaderMap::new(),
            body: Bytes::new(),
            deadline: None,
            retry_safe: false,
            error: None,
        }
    }
}

/// One call being prepared; [`send`](Self::send) it.
#[derive(Debug)]
#[must_use = "a request does nothing until it is sent"]
pub struct RequestBuilder<'a> {
    caller: Caller<'a>,
    uri: Result<Uri, ClientError>,
    method: Method,
    headers: http::HeaderMap,
    body: Bytes,
    deadline: Option<Duration>,
    retry_safe: bool,
    error: Option<ClientError>,
}

impl RequestBuilder<'_> {
    /// Sends `value` as a JSON body.
    pub fn json<T: serde::Serialize + ?Sized>(mut self, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => {
                self.body = body.into();
                self.headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
            }
            Err(e) => {
                self.error = Some(self.caller.downstream.invalid(format!("body: {e}")));
            }
        }
        self
    }

    /// Sends `body` with `content_type`.
    pub fn body(mut self, body: impl Into<Bytes>, content_type: HeaderValue) -> Self {
        self.body = body.into();
        self.headers.insert(header::CONTENT_TYPE, content_type);
        self
    }

    /// Adds a header. The chassis' own headers (correlation, trace,
    /// `authorization`, `x-timeout-ms`) are set by the stack and cannot be
    /// overridden here.
    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.append(name, value);
        self
    }

    /// Sets the `Idempotency-Key`, which makes the call safe to retry.
    pub fn idempotency_key(mut self, key: &str) -> Self {
        match HeaderValue::from_str(key) {
            Ok(v) => {
                self.headers.insert(IDEMPOTENCY_KEY, v);
            }
            Err(_) => {
                self.error = Some(
                    self.caller
                        .downstream
                        .invalid("the idempotency key is not a valid header value".to_owned()),
                );
            }
        }
        self
    }

    /// Marks the call safe to retry although its method is not idempotent
    /// and it has no `Idempotency-Key`, because the downstream documents the
    /// operation as idempotent (confirming a confirmed reservation changes
    /// nothing). See [`RetrySafe`](crate::retry::RetrySafe); when in doubt,
    /// send an [`idempotency_key`](Self::idempotency_key) instead.
    pub fn retry_safe(mut self) -> Self {
        self.retry_safe = true;
        self
    }

    /// Sets the deadline of this call instead of the downstream's default.
    pub fn deadline(mut self, d: Duration) -> Self {
        self.deadline = Some(d);
        self
    }

    /// Sends the request through the stack. A 2xx answer is `Ok`; any other
    /// status is [`ClientError::Status`].
    pub async fn send(self) -> Result<ClientResponse, ClientError> {
        let downstream = self.caller.downstream;
        let method = self.method.clone();
        let start = Instant::now();
        let result = self.send_inner().await;
        let status = match &result {
            Ok(res) => Some(res.status),
            Err(ClientError::Status { status, .. }) => Some(*status),
            Err(_) => None,
        };
        record(downstream.name(), &method, status, start.elapsed());
        if let Ok(res) = &result {
            downstream.notice_deprecation(&res.headers);
        }
        if let Err(e) = &result {
            tracing::warn!(downstream = downstream.name(), method = %method, error = %e, "downstream call failed");
        }
        result
    }

    async fn send_inner(self) -> Result<ClientResponse, ClientError> {
        let Caller {
            downstream,
            cx,
            identity,
        } = self.caller;
        if let Some(e) = self.error {
            return Err(e);
        }
        let uri = self.uri?;
        let inner = &downstream.inner;
        let name = &inner.name;

        // Correlation and trace context.
        let mut headers = self.headers;
        for h in [
            X_CORRELATION_ID,
            TRACEPARENT,
            TRACESTATE,
            header::AUTHORIZATION,
            crate::protect::X_TIMEOUT_MS,
        ] {
            headers.remove(h);
        }
        // Each attempt sends a `traceparent` naming its own client span
        // (see the transport's attempt step).
        let corr = cx.correlation();
        headers.insert(X_CORRELATION_ID, corr.id().header_value().clone());
        if let Some(ts) = corr.trace().tracestate() {
            headers.insert(TRACESTATE, ts.clone());
        }
        let call_trace = transport::CallTrace(corr.trace().clone());

        // Identity.
        let authorization = match identity {
            Identity::None => None,
            Identity::Caller => {
                let principal = cx.principal().ok_or_else(|| ClientError::NoCallerToken {
                    downstream: name.clone(),
                })?;
                match &inner.settings.audience {
                    // A token of the caller's, addressed to this downstream.
                    Some(audience) => {
                        let tokens = inner.tokens.as_ref().ok_or_else(|| ClientError::Token {
                            downstream: name.clone(),
                            source: TokenError::NotConfigured,
                        })?;
                        Some(
                            tokens
                                .exchange(principal.bearer_token(), audience)
                                .await
                                .map_err(|source| ClientError::Token {
                                    downstream: name.clone(),
                                    source,
                                })?,
                        )
                    }
                    None => {
                        let mut v =
                            HeaderValue::from_str(&format!("Bearer {}", principal.bearer_token()))
                                .map_err(|_| ClientError::NoCallerToken {
                                    downstream: name.clone(),
                                })?;
                        v.set_sensitive(true);
                        Some(v)
                    }
                }
            }
            Identity::Service => {
                let tokens = inner
                    .own_tokens
                    .as_ref()
                    .ok_or_else(|| ClientError::Token {
                        downstream: name.clone(),
                        source: TokenError::NotConfigured,
                    })?;
                Some(
                    tokens
                        .authorization()
                        .await
                        .map_err(|source| ClientError::Token {
                            downstream: name.clone(),
                            source,
                        })?,
                )
            }
        };
        if let Some(v) = authorization {
            headers.insert(header::AUTHORIZATION, v);
        }

        // Deadline.
        let now = Instant::now();
        let budget = self.deadline.unwrap_or(inner.settings.deadline);
        let mut deadline = now + budget;
        if let Some(caller) = cx.deadline() {
            deadline = deadline.min(caller);
        }
        if deadline <= now {
            return Err(ClientError::Timeout {
                downstream: name.clone(),
                after: Duration::ZERO,
            });
        }

        #[cfg(feature = "contract")]
        let recording = downstream.recorder().map(|r| {
            let sent = uri.path_and_query().map_or("", |pq| pq.as_str());
            let path = sent.strip_prefix(&*inner.prefix).unwrap_or(sent).to_owned();
            (r, path, self.method.clone(), self.body.clone())
        });
        let mut req = Request::new(Full::new(self.body));
        *req.method_mut() = self.method;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        req.extensions_mut()
            .insert(transport::CallDeadline(deadline));
        req.extensions_mut().insert(call_trace);
        if self.retry_safe {
            req.extensions_mut().insert(crate::retry::RetrySafe);
        }
        if inner.balancer.is_some() {
            // Shared by the call's attempts, so that a retry goes elsewhere.
            req.extensions_mut().insert(balance::LastPick::default());
        }

        let call = inner.stack.clone().oneshot(req);
        let res = match tokio::time::timeout_at(deadline, call).await {
            Ok(Ok(res)) => res,
            Ok(Err(e)) => return Err(ClientError::from_stack(name, &e)),
            Err(_) => {
                return Err(ClientError::Timeout {
                    downstream: name.clone(),
                    after: deadline.saturating_duration_since(now),
                });
            }
        };
        let (parts, body) = res.into_parts();
        #[cfg(feature = "contract")]
        let recorded = recording.map(|(recorder, path, method, request)| {
            let index = recorder.record(name, &method, &path, &request, parts.status, &body);
            (recorder.clone(), index)
        });
        if parts.status.is_success() {
            Ok(ClientResponse {
                status: parts.status,
                headers: parts.headers,
                body,
                downstream: name.clone(),
                #[cfg(feature = "contract")]
                recorded,
            })
        } else {
            Err(ClientError::from_status(
                name,
                parts.status,
                &parts.headers,
                body,
            ))
        }
    }
}

fn record(downstream: &str, method: &Method, status: Option<StatusCode>, elapsed: Duration) {
    let status = status.map_or(metrics::SharedString::const_str("error"), |s| {
        metrics::SharedString::from(s.as_str().to_owned())
    });
    let method = crate::metrics::method_label_of(crate::metrics::method_index(method));
    metrics::histogram!(
        crate::metrics::HTTP_CLIENT_REQUEST_DURATION,
        "service" => crate::metrics::service_label(),
        "downstream" => downstream.to_owned(),
        "http_request_method" => method,
        "http_response_status_code" => status,
    )
    .record(elapsed.as_secs_f64());
}

/// A successful (2xx) answer, its body read whole.
#[derive(Debug, Clone)]
pub struct ClientResponse {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
    downstream: Arc<str>,
    /// The recorder and index of this call, in a contract test.
    #[cfg(feature = "contract")]
    recorded: Option<(Recorder, usize)>,
}

impl ClientResponse {
    /// The status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The headers.
    pub fn headers(&self) -> &http::HeaderMap {
        &self.headers
    }

    /// The body.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The body, parsed as JSON into `T`.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, ClientError> {
        let value = serde_json::from_slice(&self.body).map_err(|e| ClientError::Decode {
            downstream: self.downstream.clone(),
            message: e.to_string(),
        })?;
        #[cfg(feature = "contract")]
        if let Some((recorder, index)) = &self.recorded {
            recorder.probe::<T>(*index, &self.body);
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests;
