//! Keys fetched from an issuer's JWKS URL, cached and refreshed.
//!
//! The numbers follow panva/jose's remote key set, which the wider ecosystem
//! trusts: fetches time out after 5 s; the set is refreshed when older than
//! its max age (the response's `Cache-Control: max-age`, kept between 1 min
//! and 1 day, 10 min when absent); a token naming an unknown `kid` triggers a
//! refetch only when the last attempt is older than the 30 s cooldown, so a
//! flood of made-up kids costs at most one fetch per cooldown. Concurrent
//! callers share one attempt and its outcome (single flight): a caller that
//! waited for an attempt that failed gets the failure, and never starts one of
//! its own; while no set was ever loaded, attempts are at least `cold_retry`
//! (1 s) apart, so a key server that is down sees O(1) requests per second
//! however many callers there are. A fetch result older than the one applied
//! is dropped (sequence guard). When a refresh fails, the last good set is
//! kept (stale-if-error) for up to 24 h. Responses are capped at 64 KiB, must
//! be JSON, and redirects are not followed.
//!
//! A refresh that changes what a `kid` vouches for (its key material or
//! algorithms), removes a `kid`, or makes one ambiguous, starts a new
//! generation: verifications cached under the old set stop counting.
//!
//! With discovery (OpenID Connect Discovery 1.0, RFC 8414), the key set's
//! URL is read from `{issuer}/.well-known/openid-configuration` before the
//! first fetch, and again after a fetch fails. The document's `issuer` must
//! equal the configured issuer exactly; otherwise no key is loaded, the
//! service stays unready, and the log says why. An `https://` issuer's
//! `jwks_uri` must be `https://` too.

use std::{
    fmt,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use jsonwebtoken::Algorithm;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Reason, keys::KeySet};
use crate::{
    health::{Check, CheckError},
    tls::{self, ClientTls},
};

/// Tuning of a remote key set; the defaults are the standard's numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JwksOptions {
    /// Longest a fetch may take (5 s).
    pub timeout: Duration,
    /// Least time between two fetches caused by unknown kids or a stale set (30 s).
    pub cooldown: Duration,
    /// Max age when the response has no `Cache-Control: max-age` (10 min).
    pub default_max_age: Duration,
    /// Bounds on a `max-age` from the response (1 min to 1 day).
    pub max_age_bounds: (Duration, Duration),
    /// How long the last good set is used while refreshes fail (24 h).
    pub stale_limit: Duration,
    /// Largest accepted response (64 KiB).
    pub max_bytes: usize,
    /// Least time between two fetches while no set was ever loaded (1 s).
    pub cold_retry: Duration,
}

impl Default for JwksOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
            cooldown: Duration::from_secs(30),
            default_max_age: Duration::from_secs(600),
            max_age_bounds: (Duration::from_secs(60), Duration::from_secs(86_400)),
            stale_limit: Duration::from_secs(86_400),
            max_bytes: 64 * 1024,
            cold_retry: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    keys: Option<Arc<KeySet>>,
    fetched_at: Option<Instant>,
    max_age: Duration,
    last_attempt: Option<Instant>,
    /// Attempts finished, successful or not: a caller that saw `n` and finds
    /// more after waiting shares that attempt's outcome.
    attempts: u64,
    applied_seq: u64,
    /// The key set URL the discovery document named, until a fetch fails.
    discovered: Option<Uri>,
    /// Bumped whenever a refresh removes a kid, so cached verifications made
    /// with a removed key stop counting.
    generation: u64,
}

/// Where a key set's URL comes from.
#[derive(Debug, Clone)]
enum Location {
    /// Configured.
    Fixed(Uri),
    /// Named by the discovery document at this URL.
    Discovered(Uri),
}

/// A key set at a URL.
pub(crate) struct RemoteJwks {
    issuer: Arc<str>,
    location: Location,
    options: JwksOptions,
    allowed: Vec<Algorithm>,
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    state: RwLock<State>,
    next_seq: AtomicU64,
    single_flight: tokio::sync::Mutex<()>,
}

impl fmt::Debug for RemoteJwks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteJwks")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

/// Why a fetch failed (logged, never sent to a client).
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("timed out")]
    Timeout,
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("answered {0}")]
    Status(StatusCode),
    #[error("content type is not JSON")]
    ContentType,
    #[error("response larger than the limit")]
    TooLarge,
    #[error("not a usable key set: {0}")]
    Invalid(String),
    #[error("discovery: {0}")]
    Discovery(String),
}

/// The members of a discovery document the verifier reads.
#[derive(serde::Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

/// Checks that `url` is an absolute `http(s)://` URL; warns when it is plain
/// `http://` to a host that is not loopback.
fn remote_url(url: &str, what: &str) -> Result<Uri, String> {
    let uri: Uri = url.parse().map_err(|_| format!("`{url}` is not a URL"))?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
    if !scheme_ok || uri.authority().is_none() {
        return Err(format!(
            "`{url}` must be an absolute https:// (or http://) URL"
        ));
    }
    if tls::is_plain_remote(&uri) {
        tracing::warn!(
            url,
            "the {what} is fetched over plain http: anyone on the path can swap the keys; use https:// unless a sidecar terminates TLS"
        );
    }
    Ok(uri)
}

/// `{issuer}/.well-known/openid-configuration`.
pub(crate) fn discovery_url(issuer: &str) -> String {
    format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    )
}

impl RemoteJwks {
    /// The key set at `url`, or, with `url` `None`, the one the issuer's
    /// discovery document names.
    pub(crate) fn new(
        issuer: &str,
        url: Option<&str>,
        options: JwksOptions,
        allowed: &[Algorithm],
        tls: &ClientTls,
    ) -> Result<Self, String> {
        let location = match url {
            Some(url) => Location::Fixed(remote_url(url, "key set")?),
            None => Location::Discovered(
                remote_url(&discovery_url(issuer), "discovery document")
                    .map_err(|e| format!("issuer {issuer:?} cannot be discovered: {e}"))?,
            ),
        };
        let client = Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(tls.connector(Some(options.timeout)));
        Ok(Self {
            issuer: issuer.into(),
            location,
            options,
            allowed: allowed.to_vec(),
            client,
            state: RwLock::new(State::default()),
            next_seq: AtomicU64::new(1),
            single_flight: tokio::sync::Mutex::new(()),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The current keys and their generation, if a set is loaded and not
    /// past the stale limit. Never waits.
    pub(crate) fn current(&self) -> Option<(Arc<KeySet>, u64)> {
        let s = self.read();
        let fresh_enough = s
            .fetched_at
            .is_some_and(|t| t.elapsed() < s.max_age + self.options.stale_limit);
        match (&s.keys, fresh_enough) {
            (Some(k), true) => Some((k.clone(), s.generation)),
            _ => None,
        }
    }

    /// The generation of the current set.
    pub(crate) fn generation(&self) -> u64 {
        self.read().generation
    }

    /// Keys for a token naming `kid`, refreshing first when the set is
    /// missing, stale, or lacks `kid` (each within its rate limit).
    pub(crate) async fn keys_for(&self, kid: Option<&str>) -> Result<(Arc<KeySet>, u64), Reason> {
        let (needs, seen) = {
            let s = self.read();
            let now = Instant::now();
            let since_attempt = s.last_attempt.map(|t| now.saturating_duration_since(t));
            let needs = match (&s.keys, s.fetched_at) {
                (None, _) | (_, None) => since_attempt.is_none_or(|d| d >= self.options.cold_retry),
                (Some(keys), Some(at)) => {
                    let stale = now.saturating_duration_since(at) >= s.max_age;
                    let missing = kid.is_some_and(|k| !keys.contains_kid(k));
                    (stale || missing) && since_attempt.is_none_or(|d| d >= self.options.cooldown)
                }
            };
            (needs, s.attempts)
        };
        if needs {
            self.refresh_after(seen).await;
        } else if self.current().is_none() {
            // A fetch may be in flight: wait for it rather than fail.
            drop(self.single_flight.lock().await);
        }
        self.current().ok_or(Reason::JwksUnavailable)
    }

    /// Fetches unless an attempt finished after the caller saw `seen`
    /// attempts: then its outcome, success or failure, is the caller's too
    /// (single flight).
    async fn refresh_after(&self, seen: u64) {
        let _flight = self.single_flight.lock().await;
        if self.read().attempts > seen {
            return;
        }
        self.refresh().await;
    }

    /// One fetch, applied if it succeeds. Returns whether it did.
    pub(crate) async fn refresh(&self) -> bool {
        let seq = self.next_seq.fetch_add(1, Ordering::SeqCst);
        self.write().last_attempt = Some(Instant::now());
        let outcome = tokio::time::timeout(self.options.timeout, self.fetch()).await;
        let result = match outcome {
            Ok(r) => r,
            Err(_) => Err(FetchError::Timeout),
        };
        {
            let mut s = self.write();
            s.attempts += 1;
            if result.is_err() {
                // Discover again next time: the key set may have moved.
                s.discovered = None;
            }
        }
        match result {
            Ok((keys, max_age)) => {
                let n = keys.len();
                let applied = self.apply(seq, keys, max_age);
                metrics::counter!("jwks_fetches_total", "issuer" => self.issuer.to_string(), "outcome" => "ok").increment(1);
                if applied {
                    metrics::gauge!("jwks_keys", "issuer" => self.issuer.to_string()).set(n as f64);
                    tracing::debug!(issuer = %self.issuer, keys = n, "key set refreshed");
                }
                true
            }
            Err(e) => {
                metrics::counter!("jwks_fetches_total", "issuer" => self.issuer.to_string(), "outcome" => "error").increment(1);
                let have = self.read().keys.is_some();
                tracing::warn!(issuer = %self.issuer, location = ?self.location, error = %e, keeping_last_good = have, "key set fetch failed");
                false
            }
        }
    }

    /// Applies a fetched set unless a later fetch was applied already.
    fn apply(&self, seq: u64, keys: KeySet, max_age: Duration) -> bool {
        let mut s = self.write();
        if seq < s.applied_seq {
            return false;
        }
        if let Some(old) = &s.keys
            && !keys.still_vouches_for(old)
        {
            s.generation += 1;
        }
        s.keys = Some(Arc::new(keys));
        s.fetched_at = Some(Instant::now());
        s.max_age = max_age;
        s.applied_seq = seq;
        true
    }

    async fn fetch(&self) -> Result<(KeySet, Duration), FetchError> {
        let uri = match &self.location {
            Location::Fixed(uri) => uri.clone(),
            Location::Discovered(document) => {
                let known = self.read().discovered.clone();
                match known {
                    Some(uri) => uri,
                    None => {
                        let uri = self.discover(document).await?;
                        self.write().discovered = Some(uri.clone());
                        uri
                    }
                }
            }
        };
        let (headers, body) = self
            .get_json(&uri, "application/jwk-set+json, application/json")
            .await?;
        let max_age = self.max_age(&headers);
        let keys = KeySet::from_jwks(&body, &self.allowed)
            .map_err(|e| FetchError::Invalid(e.to_string()))?;
        if keys.is_empty() {
            return Err(FetchError::Invalid("no usable key".to_owned()));
        }
        Ok((keys, max_age))
    }

    /// Reads the discovery document and returns its `jwks_uri`, once its
    /// `issuer` is checked.
    async fn discover(&self, document: &Uri) -> Result<Uri, FetchError> {
        let (_, body) = self.get_json(document, "application/json").await?;
        let doc: Discovery = serde_json::from_slice(&body).map_err(|e| {
            FetchError::Discovery(format!("{document} is not a discovery document: {e}"))
        })?;
        if doc.issuer != *self.issuer {
            return Err(FetchError::Discovery(format!(
                "{document} names issuer {:?}, not the configured {:?}; no key is trusted",
                doc.issuer, self.issuer
            )));
        }
        let uri = remote_url(&doc.jwks_uri, "key set").map_err(FetchError::Discovery)?;
        if document.scheme_str() == Some("https") && uri.scheme_str() != Some("https") {
            return Err(FetchError::Discovery(format!(
                "jwks_uri {uri} is not https:// while the issuer is"
            )));
        }
        tracing::info!(issuer = %self.issuer, jwks_uri = %uri, "issuer discovered");
        Ok(uri)
    }

    /// A GET answered 200 with a JSON body of at most `max_bytes`.
    async fn get_json(&self, uri: &Uri, accept: &str) -> Result<(HeaderMap, Bytes), FetchError> {
        let req = http::Request::get(uri.clone())
            .header(header::ACCEPT, accept)
            .body(Empty::new())
            .map_err(|e| FetchError::Connect(e.to_string()))?;
        let res = self
            .client
            .request(req)
            .await
            .map_err(|e| FetchError::Connect(tls::error_chain(&e)))?;
        if res.status() != StatusCode::OK {
            return Err(FetchError::Status(res.status()));
        }
        let json = res
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| {
                let ct = ct.to_ascii_lowercase();
                ct.starts_with("application/json") || ct.starts_with("application/jwk-set+json")
            });
        if !json {
            return Err(FetchError::ContentType);
        }
        let declared = res
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
        if declared.is_some_and(|n| n > self.options.max_bytes) {
            return Err(FetchError::TooLarge);
        }
        let (parts, body) = res.into_parts();
        let body = Limited::new(body, self.options.max_bytes)
            .collect()
            .await
            .map_err(|_| FetchError::TooLarge)?
            .to_bytes();
        Ok((parts.headers, body))
    }

    fn max_age(&self, headers: &HeaderMap) -> Duration {
        let (lo, hi) = self.options.max_age_bounds;
        let Some(cc) = headers
            .get(header::CACHE_CONTROL)
            .and_then(|v| v.to_str().ok())
        else {
            return self.options.default_max_age;
        };
        let mut max_age = None;
        for directive in cc.split(',').map(str::trim) {
            let lower = directive.to_ascii_lowercase();
            if lower == "no-store" || lower == "no-cache" {
                return lo;
            }
            if let Some(v) = lower.strip_prefix("max-age=") {
                max_age = v
                    .trim_matches('"')
                    .parse::<u64>()
                    .ok()
                    .map(Duration::from_secs);
            }
        }
        max_age.map_or(self.options.default_max_age, |d| d.clamp(lo, hi))
    }

    /// Keeps the set fresh: refreshes at its max age, retries failures after
    /// the cooldown (sooner while nothing was ever loaded).
    pub(crate) async fn run(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let wait = {
                let s = self.read();
                match (s.fetched_at, s.keys.is_some()) {
                    (Some(at), true) => {
                        let due = at + s.max_age;
                        let failed_since = s.last_attempt.is_some_and(|t| t > at);
                        if failed_since {
                            self.options.cooldown
                        } else {
                            due.saturating_duration_since(Instant::now())
                        }
                    }
                    _ if s.last_attempt.is_none() => Duration::ZERO,
                    _ => self.options.cold_retry.max(Duration::from_secs(1)),
                }
            };
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            let seen = self.read().attempts;
            self.refresh_after(seen).await;
        }
    }
}

/// Readiness of a remote key set: up once a set has been loaded.
pub(crate) struct JwksReady(pub(crate) Arc<RemoteJwks>);

impl Check for JwksReady {
    async fn check(&self) -> Result<(), CheckError> {
        if self.0.current().is_some() {
            return Ok(());
        }
        let seen = self.0.read().attempts;
        self.0.refresh_after(seen).await;
        if self.0.current().is_some() {
            Ok(())
        } else {
            Err(CheckError::new(format!(
                "no key set loaded for issuer {} (the log says why)",
                self.0.issuer
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote() -> RemoteJwks {
        RemoteJwks::new(
            "iss",
            Some("http://127.0.0.1:9/jwks"),
            JwksOptions::default(),
            &[Algorithm::RS256],
            &ClientTls::global(),
        )
        .unwrap()
    }

    // J10: an older fetch finishing last does not overwrite a newer one.
    #[tokio::test(start_paused = true)]
    async fn sequence_guard_keeps_the_newest() {
        let r = remote();
        let a = KeySet::default();
        let b = KeySet::default();
        assert!(r.apply(2, b, Duration::from_secs(60)));
        assert!(
            !r.apply(1, a, Duration::from_secs(999)),
            "older result dropped"
        );
        assert_eq!(r.read().applied_seq, 2);
        assert_eq!(r.read().max_age, Duration::from_secs(60));
    }

    #[test]
    fn cache_control_is_bounded() {
        let r = remote();
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::CACHE_CONTROL, v.parse().unwrap());
            m
        };
        assert_eq!(r.max_age(&HeaderMap::new()), Duration::from_secs(600));
        assert_eq!(
            r.max_age(&h("public, max-age=300")),
            Duration::from_secs(300)
        );
        assert_eq!(r.max_age(&h("max-age=1")), Duration::from_secs(60));
        assert_eq!(
            r.max_age(&h("max-age=99999999")),
            Duration::from_secs(86_400)
        );
        assert_eq!(r.max_age(&h("no-store")), Duration::from_secs(60));
        assert_eq!(r.max_age(&h("max-age=abc")), Duration::from_secs(600));
    }

    #[tokio::test]
    async fn only_absolute_http_or_https_urls() {
        let opts = JwksOptions::default();
        let tls = ClientTls::global();
        let new = |url| RemoteJwks::new("https://i.example", Some(url), opts, &[], &tls);
        assert!(new("file:///etc/passwd").is_err());
        assert!(new("/relative").is_err());
        assert!(new("http://127.0.0.1:1/k").is_ok());
        assert!(new("https://127.0.0.1:1/k").is_ok());
        let discovered = RemoteJwks::new("https://i.example/t/", None, opts, &[], &tls).unwrap();
        assert!(
            format!("{discovered:?}")
                .contains("https://i.example/t/.well-known/openid-configuration"),
            "{discovered:?}"
        );
        assert!(RemoteJwks::new("not a url", None, opts, &[], &tls).is_err());
    }
}
