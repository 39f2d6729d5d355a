//! The service's own tokens, from the OAuth 2.0 client-credentials grant.

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, RwLock},
    time::Duration,
};

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use tokio::time::Instant;

use crate::{
    config::{Reader, Secret},
    tls::{self, ClientTls},
};

/// Why no token could be had.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// No [`TokenSource`] was given to the downstream.
    #[error("no token source is configured for calls made as the service")]
    NotConfigured,
    /// The token endpoint could not be reached or did not answer in time.
    #[error("token endpoint {url} unreachable: {reason}")]
    Unreachable {
        /// The endpoint.
        url: String,
        /// What failed.
        reason: String,
    },
    /// The token endpoint refused the client's credentials or request.
    #[error("token endpoint {url} refused the request: {status} {error}")]
    Rejected {
        /// The endpoint.
        url: String,
        /// Its status.
        status: u16,
        /// The OAuth `error` code it gave, e.g. `invalid_client`.
        error: String,
    },
    /// The token endpoint's answer was not a usable token response.
    #[error("token endpoint {url} answered an invalid token response: {reason}")]
    Invalid {
        /// The endpoint.
        url: String,
        /// What was wrong.
        reason: String,
    },
}

#[derive(Clone)]
struct Cached {
    authorization: HeaderValue,
    refresh_at: Instant,
    expires_at: Instant,
}

struct Failure {
    at: Instant,
    error: TokenError,
}

struct Inner {
    url: Uri,
    url_text: String,
    client_id: String,
    secret: Secret<String>,
    scope: Option<String>,
    audience: Option<String>,
    refresh_before: Duration,
    timeout: Duration,
    retry_after_failure: Duration,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    cached: RwLock<Option<Cached>>,
    last_failure: RwLock<Option<Failure>>,
    refresh: tokio::sync::Mutex<()>,
    /// Exchanged tokens by (audience, subject token).
    exchanged: std::sync::Mutex<HashMap<(String, String), Cached>>,
}

/// Most exchanged tokens kept; past it, expired ones are dropped, then all.
const MAX_EXCHANGED: usize = 4096;

/// RFC 8693's grant type and token type of an access token.
const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

/// Tokens for calls made as the service itself, fetched with the OAuth 2.0
/// client-credentials grant (RFC 6749 §4.4) and cached.
///
/// * A token is refreshed **before** it expires: `refresh_before` (60 s by
///   default, at most half the token's lifetime) ahead of its expiry, so a
///   call never presents a token about to expire.
/// * Concurrent callers needing a new token share **one** fetch (single
///   flight); the others wait for it.
/// * When a refresh fails while the current token is still valid, the
///   current token keeps being used and the failure is logged; once it has
///   expired, calls fail with a [`TokenError`] that says why. After a failed
///   fetch, callers within the next second get the same error instead of
///   each trying again.
/// * [`for_audience`](Self::for_audience) asks for tokens for one service
///   (the `audience` parameter), so a token for ticketing is refused by
///   mail; [`exchange`](Self::exchange) trades a caller's token for one
///   addressed to another service (RFC 8693 token exchange), cached per
///   caller token and audience until near its expiry.
/// * Client credentials go in HTTP Basic authentication, form-encoded as
///   RFC 6749 §2.3.1 asks; the secret never appears in logs or errors.
///
/// Cheap to clone (an `Arc`).
///
/// ```
/// use chassis::client::TokenSource;
/// use chassis::config::Secret;
///
/// let tokens = TokenSource::client_credentials(
///     "http://127.0.0.1:8081/auth/v1/token",
///     "orders",
///     Secret::new("s3cret".to_owned()),
/// )
/// .unwrap();
/// assert!(!format!("{tokens:?}").contains("s3cret"));
/// ```
#[derive(Clone)]
pub struct TokenSource {
    inner: Arc<Inner>,
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSource")
            .field("url", &self.inner.url_text)
            .field("client_id", &self.inner.client_id)
            .field("secret", &self.inner.secret)
            .finish_non_exhaustive()
    }
}

/// A token endpoint's successful answer (RFC 6749 §5.1).
#[derive(serde::Deserialize)]
struct TokenResponse {
    access_token: String,
    token_type: String,
    expires_in: Option<u64>,
}

/// A token endpoint's error answer (RFC 6749 §5.2).
#[derive(serde::Deserialize)]
struct ErrorResponse {
    error: String,
}

/// Lifetime assumed when the endpoint does not send `expires_in`.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);
/// Longest lifetime believed: a larger `expires_in` (even `u64::MAX`) is
/// cut to this, so the token is still refreshed daily.
const MAX_LIFETIME: Duration = Duration::from_secs(86_400);
/// Largest token response read.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

impl TokenSource {
    /// Tokens for `client_id` from the token endpoint at `token_url`, an
    /// `https://` URL (or `http://` on loopback or behind a sidecar that
    /// terminates TLS: see [`tls`](crate::tls)). Fails when the URL is not
    /// one.
    pub fn client_credentials(
        token_url: &str,
        client_id: &str,
        client_secret: Secret<String>,
    ) -> Result<Self, String> {
        let url: Uri = token_url
            .parse()
            .map_err(|e| format!("token URL {token_url:?} is not a URL: {e}"))?;
        let scheme_ok = url.scheme() == Some(&http::uri::Scheme::HTTP)
            || url.scheme() == Some(&http::uri::Scheme::HTTPS);
        if !scheme_ok || url.authority().is_none() {
            return Err(format!(
                "token URL {token_url:?} must be an absolute https:// (or http://) URL"
            ));
        }
        if tls::is_plain_remote(&url) {
            tracing::warn!(url = %token_url, "the client secret goes to a token endpoint over plain http; use https:// unless a sidecar terminates TLS");
        }
        let client = client_for(&ClientTls::global());
        Ok(Self {
            inner: Arc::new(Inner {
                url,
                url_text: token_url.to_owned(),
                client_id: client_id.to_owned(),
                secret: client_secret,
                scope: None,
                audience: None,
                refresh_before: Duration::from_secs(60),
                timeout: Duration::from_secs(5),
                retry_after_failure: Duration::from_secs(1),
                client,
                cached: RwLock::new(None),
                last_failure: RwLock::new(None),
                refresh: tokio::sync::Mutex::new(()),
                exchanged: std::sync::Mutex::default(),
            }),
        })
    }

    /// [`read`](Self::read) for a service that cannot work without its own
    /// identity: when none of the three variables is set, each is a
    /// problem saying `required: {why}`.
    ///
    /// ```
    /// use chassis::{client::TokenSource, config::{Env, Reader}};
    ///
    /// let env = Env::from_pairs(Vec::<(String, String)>::new());
    /// let mut r = Reader::new(&env);
    /// assert!(TokenSource::read_required(&mut r, "orders calls ticketing as itself").is_none());
    /// let problems = r.finish().unwrap_err().to_string();
    /// for name in ["CHASSIS_CLIENT_TOKEN_URL", "CHASSIS_CLIENT_ID", "CHASSIS_CLIENT_SECRET"] {
    ///     assert!(problems.contains(name), "{problems}");
    /// }
    /// assert!(problems.contains("required: orders calls ticketing as itself"), "{problems}");
    /// ```
    pub fn read_required(r: &mut Reader<'_>, why: &str) -> Option<Self> {
        const NAMES: [&str; 3] = [
            "CHASSIS_CLIENT_TOKEN_URL",
            "CHASSIS_CLIENT_ID",
            "CHASSIS_CLIENT_SECRET",
        ];
        let tokens = Self::read(r);
        // One set and another missing is already a problem of `read`.
        if tokens.is_none() && NAMES.iter().all(|n| r.maybe::<String>(n, "").is_none()) {
            for name in NAMES {
                r.problem(name, format!("required: {why}"));
            }
        }
        tokens
    }

    /// Reads `CHASSIS_CLIENT_TOKEN_URL`, `CHASSIS_CLIENT_ID` and
    /// `CHASSIS_CLIENT_SECRET`: `None` when none is set; all three are needed
    /// when one is.
    pub fn read(r: &mut Reader<'_>) -> Option<Self> {
        let url: Option<String> = r.maybe("CHASSIS_CLIENT_TOKEN_URL", "token endpoint URL");
        let id: Option<String> = r.maybe("CHASSIS_CLIENT_ID", "the service's client id");
        let secret = r.maybe_secret("CHASSIS_CLIENT_SECRET", "the service's client secret");
        if url.is_none() && id.is_none() && secret.is_none() {
            return None;
        }
        for (name, missing) in [
            ("CHASSIS_CLIENT_TOKEN_URL", url.is_none()),
            ("CHASSIS_CLIENT_ID", id.is_none()),
            ("CHASSIS_CLIENT_SECRET", secret.is_none()),
        ] {
            if missing {
                r.problem(
                    name,
                    "required when any of CHASSIS_CLIENT_TOKEN_URL, CHASSIS_CLIENT_ID, CHASSIS_CLIENT_SECRET is set",
                );
            }
        }
        let (url, id, secret) = (url?, id?, secret?);
        match Self::client_credentials(&url, &id, secret) {
            Ok(tokens) => Some(tokens),
            Err(e) => {
                r.problem("CHASSIS_CLIENT_TOKEN_URL", e);
                None
            }
        }
    }

    /// Asks for `scope`.
    #[must_use]
    pub fn scope(self, scope: &str) -> Self {
        self.with(|i| i.scope = Some(scope.to_owned()))
    }

    /// The same client, asking for tokens addressed to `audience` (the
    /// `audience` parameter of the token request), with a cache of its own.
    #[must_use]
    pub fn for_audience(&self, audience: &str) -> Self {
        self.clone()
            .with(|i| i.audience = Some(audience.to_owned()))
    }

    /// The audience asked for, if any.
    pub fn audience(&self) -> Option<&str> {
        self.inner.audience.as_deref()
    }

    /// Refreshes tokens this long before they expire (at most half their
    /// lifetime).
    #[must_use]
    pub fn refresh_before(self, d: Duration) -> Self {
        self.with(|i| i.refresh_before = d)
    }

    /// Gives up on a fetch after `d` (5 s by default).
    #[must_use]
    pub fn timeout(self, d: Duration) -> Self {
        self.with(|i| i.timeout = d)
    }

    /// The TLS settings for an `https://` token endpoint (default
    /// [`ClientTls::global`]).
    #[must_use]
    pub fn tls(self, tls: &ClientTls) -> Self {
        let client = client_for(tls);
        self.with(|i| i.client = client)
    }

    fn with(self, f: impl FnOnce(&mut Inner)) -> Self {
        let mut inner = Arc::try_unwrap(self.inner).unwrap_or_else(|shared| Inner {
            url: shared.url.clone(),
            url_text: shared.url_text.clone(),
            client_id: shared.client_id.clone(),
            secret: shared.secret.clone(),
            scope: shared.scope.clone(),
            audience: shared.audience.clone(),
            refresh_before: shared.refresh_before,
            timeout: shared.timeout,
            retry_after_failure: shared.retry_after_failure,
            client: shared.client.clone(),
            cached: RwLock::new(None),
            last_failure: RwLock::new(None),
            refresh: tokio::sync::Mutex::new(()),
            exchanged: std::sync::Mutex::default(),
        });
        f(&mut inner);
        Self {
            inner: Arc::new(inner),
        }
    }

    /// The client id.
    pub fn client_id(&self) -> &str {
        &self.inner.client_id
    }

    /// The `Authorization` header value (`Bearer …`, marked sensitive) to
    /// present, fetching a token when there is none or it is due for
    /// refresh.
    pub async fn authorization(&self) -> Result<HeaderValue, TokenError> {
        if let Some(fresh) = self.current(true) {
            return Ok(fresh);
        }
        let _flight = self.inner.refresh.lock().await;
        // Whoever held the lock may have refreshed it meanwhile.
        if let Some(fresh) = self.current(true) {
            return Ok(fresh);
        }
        if let Some(error) = self.recent_failure() {
            return self.current(false).ok_or(error);
        }
        match self.fetch_own().await {
            Ok(cached) => {
                let authorization = cached.authorization.clone();
                *write(&self.inner.cached) = Some(cached);
                *write(&self.inner.last_failure) = None;
                Ok(authorization)
            }
            Err(error) => {
                *write(&self.inner.last_failure) = Some(Failure {
                    at: Instant::now(),
                    error: error.clone(),
                });
                match self.current(false) {
                    Some(still_valid) => {
                        tracing::warn!(%error, "token refresh failed; using the current token until it expires");
                        Ok(still_valid)
                    }
                    None => {
                        tracing::error!(%error, "no service token");
                        Err(error)
                    }
                }
            }
        }
    }

    /// The cached token, if not due for refresh (`fresh`) or not expired.
    fn current(&self, fresh: bool) -> Option<HeaderValue> {
        let now = Instant::now();
        let cached = self
            .inner
            .cached
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        cached
            .as_ref()
            .filter(|c| now < if fresh { c.refresh_at } else { c.expires_at })
            .map(|c| c.authorization.clone())
    }

    fn recent_failure(&self) -> Option<TokenError> {
        let failure = self
            .inner
            .last_failure
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        failure
            .as_ref()
            .filter(|f| f.at.elapsed() < self.inner.retry_after_failure)
            .map(|f| f.error.clone())
    }

    /// A token for calls to `audience` on behalf of the caller whose token
    /// is `subject_token`, by RFC 8693 token exchange at the token endpoint,
    /// authenticated as this client. Cached until near its expiry.
    pub async fn exchange(
        &self,
        subject_token: &str,
        audience: &str,
    ) -> Result<HeaderValue, TokenError> {
        let key = (audience.to_owned(), subject_token.to_owned());
        let now = Instant::now();
        if let Some(hit) = self.exchanged().get(&key).filter(|c| now < c.refresh_at) {
            return Ok(hit.authorization.clone());
        }
        let cached = self
            .fetch(&[
                ("grant_type", TOKEN_EXCHANGE),
                ("subject_token", subject_token),
                ("subject_token_type", ACCESS_TOKEN_TYPE),
                ("requested_token_type", ACCESS_TOKEN_TYPE),
                ("audience", audience),
            ])
            .await?;
        let authorization = cached.authorization.clone();
        let mut map = self.exchanged();
        if map.len() >= MAX_EXCHANGED {
            map.retain(|_, c| now < c.expires_at);
            if map.len() >= MAX_EXCHANGED {
                map.clear();
            }
        }
        map.insert(key, cached);
        Ok(authorization)
    }

    fn exchanged(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Cached>> {
        self.inner
            .exchanged
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The client-credentials request of this source.
    async fn fetch_own(&self) -> Result<Cached, TokenError> {
        let i = &self.inner;
        let mut form = vec![("grant_type", "client_credentials")];
        if let Some(scope) = &i.scope {
            form.push(("scope", scope));
        }
        if let Some(audience) = &i.audience {
            form.push(("audience", audience));
        }
        self.fetch(&form).await
    }

    async fn fetch(&self, form: &[(&str, &str)]) -> Result<Cached, TokenError> {
        let i = &self.inner;
        let url = || i.url_text.clone();
        let body = serde_urlencoded::to_string(form).map_err(|e| TokenError::Invalid {
            url: url(),
            reason: e.to_string(),
        })?;
        let credentials = format!(
            "{}:{}",
            form_urlencoded::byte_serialize(i.client_id.as_bytes()).collect::<String>(),
            form_urlencoded::byte_serialize(i.secret.expose().as_bytes()).collect::<String>()
        );
        let mut basic = HeaderValue::from_str(&format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(credentials)
        ))
        .map_err(|_| TokenError::Invalid {
            url: url(),
            reason: "the client credentials are not valid in a header".to_owned(),
        })?;
        basic.set_sensitive(true);
        let req = Request::builder()
            .method(Method::POST)
            .uri(i.url.clone())
            .header(header::AUTHORIZATION, basic)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| TokenError::Invalid {
                url: url(),
                reason: e.to_string(),
            })?;
        let started = Instant::now();
        let exchange = async {
            let res = i
                .client
                .request(req)
                .await
                .map_err(|e| TokenError::Unreachable {
                    url: url(),
                    reason: tls::error_chain(&e),
                })?;
            let status = res.status();
            let body = Limited::new(res.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| TokenError::Unreachable {
                    url: url(),
                    reason: format!("reading the answer: {e}"),
                })?
                .to_bytes();
            Ok::<_, TokenError>((status, body))
        };
        let (status, body) = tokio::time::timeout(i.timeout, exchange)
            .await
            .map_err(|_| TokenError::Unreachable {
                url: url(),
                reason: format!("no answer within {:?}", i.timeout),
            })??;
        if status != StatusCode::OK {
            let error = serde_json::from_slice::<ErrorResponse>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| "(no OAuth error code)".to_owned());
            return Err(TokenError::Rejected {
                url: url(),
                status: status.as_u16(),
                error,
            });
        }
        let token: TokenResponse =
            serde_json::from_slice(&body).map_err(|e| TokenError::Invalid {
                url: url(),
                reason: e.to_string(),
            })?;
        if !token.token_type.eq_ignore_ascii_case("bearer") {
            return Err(TokenError::Invalid {
                url: url(),
                reason: format!("token_type {:?} is not Bearer", token.token_type),
            });
        }
        let mut authorization = HeaderValue::from_str(&format!("Bearer {}", token.access_token))
            .map_err(|_| TokenError::Invalid {
                url: url(),
                reason: "the access token is not valid in a header".to_owned(),
            })?;
        authorization.set_sensitive(true);
        let lifetime = token
            .expires_in
            .map_or(DEFAULT_LIFETIME, Duration::from_secs)
            .min(MAX_LIFETIME);
        // Measured from when the request was sent, so the time the fetch
        // took does not make the token look younger than it is.
        let expires_at = started + lifetime;
        let refresh_at = expires_at - i.refresh_before.min(lifetime / 2);
        tracing::debug!(
            client_id = %i.client_id,
            expires_in_secs = lifetime.as_secs(),
            "fetched a service token"
        );
        Ok(Cached {
            authorization,
            refresh_at,
            expires_at,
        })
    }
}

fn client_for(tls: &ClientTls) -> Client<HttpsConnector<HttpConnector>, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build(tls.connector(None))
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
