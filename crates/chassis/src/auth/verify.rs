//! The verification pipeline: header, key, signature, claims, cache.

use std::{
    collections::HashMap,
    fmt,
    hash::BuildHasher,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use http::{HeaderMap, HeaderValue, header::AUTHORIZATION};
use jsonwebtoken::Algorithm;
use serde::Deserialize;
use serde_json::Value;

use super::{
    AuthError, Principal, PrincipalKind, Reason,
    jwks::{JwksOptions, JwksReady, RemoteJwks},
    keys::{DEFAULT_ALGORITHMS, Key, KeySet},
};
use crate::{
    env::{Reader, Secret},
    health::CheckOptions,
    permission::Grants,
    tls::ClientTls,
};

/// Longest `Authorization` value looked at (8 KiB); longer ones are refused
/// before any decoding.
pub const MAX_AUTHORIZATION_LEN: usize = 8 * 1024;
/// Longest `kid` accepted.
const MAX_KID_LEN: usize = 256;
/// Default number of verified tokens kept.
pub const DEFAULT_CACHE_CAPACITY: usize = 16 * 1024;
const CACHE_SHARDS: usize = 16;

/// Where token time checks get "now": seconds since the Unix epoch.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> u64 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }
}

/// A clock that reads a shared value: for tests.
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<std::sync::atomic::AtomicU64>);

impl ManualClock {
    /// A clock at `now`.
    pub fn new(now: u64) -> Self {
        Self(Arc::new(now.into()))
    }

    /// Sets the time.
    pub fn set(&self, now: u64) {
        self.0.store(now, std::sync::atomic::Ordering::SeqCst);
    }

    /// Moves the time forward.
    pub fn advance(&self, secs: u64) {
        self.0.fetch_add(secs, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

enum Keys {
    Static(Arc<KeySet>),
    Remote(Arc<RemoteJwks>),
}

struct Issuer {
    issuer: Box<str>,
    audience: Box<str>,
    keys: Keys,
}

/// Verifies bearer tokens; see the [module docs](super).
///
/// Cheap to clone.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

struct Inner {
    issuers: Vec<Issuer>,
    algorithms: Vec<Algorithm>,
    leeway: u64,
    max_lifetime: u64,
    clock: Arc<dyn Clock>,
    cache: TokenCache,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let issuers: Vec<&str> = self.inner.issuers.iter().map(|i| &*i.issuer).collect();
        f.debug_struct("Verifier")
            .field("issuers", &issuers)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Verifier`].
#[must_use]
pub struct VerifierBuilder {
    issuers: Vec<(String, String, KeySpec)>,
    algorithms: Vec<Algorithm>,
    leeway: u64,
    max_lifetime: u64,
    clock: Arc<dyn Clock>,
    cache_capacity: usize,
    jwks: JwksOptions,
    tls: Option<ClientTls>,
}

enum KeySpec {
    Static(Vec<Key>),
    /// A key set URL, or `None` to discover it.
    Jwks(Option<String>),
}

impl fmt::Debug for VerifierBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifierBuilder").finish_non_exhaustive()
    }
}

/// Why a verifier could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid authentication setup:{}", .0.iter().map(|p| format!("\n  - {p}")).collect::<String>())]
pub struct VerifierError(pub Vec<String>);

impl Default for VerifierBuilder {
    fn default() -> Self {
        Self {
            issuers: Vec::new(),
            algorithms: DEFAULT_ALGORITHMS.to_vec(),
            leeway: 30,
            max_lifetime: 24 * 3600,
            clock: Arc::new(SystemClock),
            cache_capacity: DEFAULT_CACHE_CAPACITY,
            jwks: JwksOptions::default(),
            tls: None,
        }
    }
}

impl VerifierBuilder {
    /// Trusts `issuer` for tokens addressed to `audience`, with keys from a
    /// JWKS URL.
    pub fn jwks(mut self, issuer: &str, audience: &str, url: &str) -> Self {
        self.issuers.push((
            issuer.to_owned(),
            audience.to_owned(),
            KeySpec::Jwks(Some(url.to_owned())),
        ));
        self
    }

    /// Trusts `issuer` for tokens addressed to `audience`, with keys from
    /// the JWKS its discovery document names
    /// (`{issuer}/.well-known/openid-configuration`, whose `issuer` must be
    /// `issuer` exactly).
    pub fn discover(mut self, issuer: &str, audience: &str) -> Self {
        self.issuers
            .push((issuer.to_owned(), audience.to_owned(), KeySpec::Jwks(None)));
        self
    }

    /// The TLS settings for `https://` key sets and discovery documents
    /// (default [`ClientTls::global`]).
    pub fn tls(mut self, tls: ClientTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Trusts `issuer` for tokens addressed to `audience`, with fixed keys.
    pub fn keys(mut self, issuer: &str, audience: &str, keys: Vec<Key>) -> Self {
        self.issuers.push((
            issuer.to_owned(),
            audience.to_owned(),
            KeySpec::Static(keys),
        ));
        self
    }

    /// The algorithms accepted (default `EdDSA`, `ES256`, `RS256`).
    pub fn algorithms(mut self, algorithms: &[Algorithm]) -> Self {
        self.algorithms = algorithms.to_vec();
        self
    }

    /// Clock skew allowed on `exp`, `nbf` and `iat` (default 30 s).
    pub fn leeway(mut self, leeway: Duration) -> Self {
        self.leeway = leeway.as_secs();
        self
    }

    /// Longest token lifetime accepted, `exp - iat` (default 24 h).
    pub fn max_lifetime(mut self, max: Duration) -> Self {
        self.max_lifetime = max.as_secs();
        self
    }

    /// Where "now" comes from (default the system clock).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// How many verified tokens to keep (default 16 Ki; 0 disables the cache).
    pub fn cache_capacity(mut self, capacity: usize) -> Self {
        self.cache_capacity = capacity;
        self
    }

    /// Tuning of remote key sets.
    pub fn jwks_options(mut self, options: JwksOptions) -> Self {
        self.jwks = options;
        self
    }

    /// Builds the verifier.
    ///
    /// # Errors
    ///
    /// Every problem at once: no issuer, a bad URL, a key whose algorithm is
    /// not allowed, an issuer trusted twice.
    pub fn build(self) -> Result<Verifier, VerifierError> {
        let mut problems = Vec::new();
        if self.issuers.is_empty() {
            problems.push("no trusted issuer".to_owned());
        }
        if self.algorithms.is_empty() {
            problems.push("no algorithm allowed".to_owned());
        }
        let mut issuers = Vec::new();
        let tls = self.tls.unwrap_or_else(ClientTls::global);
        for (issuer, audience, spec) in self.issuers {
            if issuer.is_empty() || audience.is_empty() {
                problems.push("issuer and audience must not be empty".to_owned());
            }
            if issuers.iter().any(|i: &Issuer| *i.issuer == *issuer) {
                problems.push(format!("issuer `{issuer}` is configured twice"));
            }
            let keys = match spec {
                KeySpec::Static(keys) => {
                    for k in &keys {
                        if let Some(a) = k.algorithms.iter().find(|a| !self.algorithms.contains(a))
                        {
                            problems.push(format!(
                                "a key of `{issuer}` uses {a:?}, which is not allowed"
                            ));
                        }
                    }
                    Keys::Static(Arc::new(KeySet::new(keys)))
                }
                KeySpec::Jwks(url) => {
                    match RemoteJwks::new(
                        &issuer,
                        url.as_deref(),
                        self.jwks,
                        &self.algorithms,
                        &tls,
                    ) {
                        Ok(r) => Keys::Remote(Arc::new(r)),
                        Err(e) => {
                            problems.push(e);
                            continue;
                        }
                    }
                }
            };
            issuers.push(Issuer {
                issuer: issuer.into(),
                audience: audience.into(),
                keys,
            });
        }
        if !problems.is_empty() {
            return Err(VerifierError(problems));
        }
        Ok(Verifier {
            inner: Arc::new(Inner {
                issuers,
                algorithms: self.algorithms,
                leeway: self.leeway,
                max_lifetime: self.max_lifetime,
                clock: self.clock,
                cache: TokenCache::new(self.cache_capacity),
            }),
        })
    }
}

/// Authentication settings from the environment.
///
/// | variable | default | meaning |
/// |---|---|---|
/// | `CHASSIS_AUTH_ISSUER` | none | the trusted issuer (`iss`) |
/// | `CHASSIS_AUTH_AUDIENCE` | none | this service's audience (`aud`) |
/// | `CHASSIS_AUTH_JWKS_URL` | discovered | the issuer's key set; when unset, the `jwks_uri` of `{issuer}/.well-known/openid-configuration` |
/// | `CHASSIS_AUTH_HS256_SECRET` | none | an HMAC secret of at least 32 bytes, instead of a key set |
/// | `CHASSIS_AUTH_ALGORITHMS` | `EdDSA,ES256,RS256` | accepted algorithms |
/// | `CHASSIS_AUTH_LEEWAY_SECS` | `30` | clock skew allowed |
/// | `CHASSIS_AUTH_MAX_LIFETIME_SECS` | `86400` | longest token lifetime |
///
/// Authentication is configured when `CHASSIS_AUTH_ISSUER` is set; then the
/// audience is required, and the keys come from, in this order: the HMAC
/// secret, the key set URL, or discovery (OpenID Connect Discovery 1.0: the
/// issuer's `/.well-known/openid-configuration`, whose `issuer` must equal
/// `CHASSIS_AUTH_ISSUER` exactly). The secret and the URL exclude each
/// other. `https://` URLs are verified against the roots of
/// [`tls`](crate::tls).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// `CHASSIS_AUTH_ISSUER`.
    pub issuer: String,
    /// `CHASSIS_AUTH_AUDIENCE`.
    pub audience: String,
    /// `CHASSIS_AUTH_JWKS_URL`.
    pub jwks_url: Option<String>,
    /// `CHASSIS_AUTH_HS256_SECRET`.
    pub hs256_secret: Option<Secret<String>>,
    /// `CHASSIS_AUTH_ALGORITHMS`.
    pub algorithms: Vec<Algorithm>,
    /// `CHASSIS_AUTH_LEEWAY_SECS`.
    pub leeway: Duration,
    /// `CHASSIS_AUTH_MAX_LIFETIME_SECS`.
    pub max_lifetime: Duration,
}

/// A comma-separated algorithm list.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AlgList(Vec<Algorithm>);

impl std::str::FromStr for AlgList {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let algs = s
            .split(',')
            .map(|a| {
                a.trim()
                    .parse::<Algorithm>()
                    .map_err(|_| format!("unknown algorithm `{}`", a.trim()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if algs.is_empty() {
            return Err("empty list".to_owned());
        }
        Ok(Self(algs))
    }
}

impl AuthConfig {
    /// Reads the `CHASSIS_AUTH_*` settings; `None` when authentication is
    /// not configured (or misconfigured: the problems are in `r`).
    pub fn read(r: &mut Reader<'_>) -> Option<Self> {
        let issuer: Option<String> = r.maybe("CHASSIS_AUTH_ISSUER", "trusted token issuer");
        let audience: Option<String> =
            r.maybe("CHASSIS_AUTH_AUDIENCE", "audience of this service's tokens");
        let jwks_url: Option<String> = r.maybe("CHASSIS_AUTH_JWKS_URL", "the issuer's JWKS URL");
        let secret = r.maybe_secret(
            "CHASSIS_AUTH_HS256_SECRET",
            "HMAC secret, at least 32 bytes",
        );
        let algorithms = r.optional(
            "CHASSIS_AUTH_ALGORITHMS",
            AlgList(DEFAULT_ALGORITHMS.to_vec()),
            "accepted algorithms, e.g. EdDSA,ES256,RS256",
        );
        let leeway: u64 = r.optional(
            "CHASSIS_AUTH_LEEWAY_SECS",
            30,
            "clock skew allowed, seconds",
        );
        if leeway > 300 {
            r.problem("CHASSIS_AUTH_LEEWAY_SECS", "at most 300 seconds");
        }
        let max_lifetime: u64 = r.optional(
            "CHASSIS_AUTH_MAX_LIFETIME_SECS",
            86_400,
            "longest token lifetime, seconds",
        );
        let issuer = match (issuer, &audience, &jwks_url, &secret) {
            (None, None, None, None) => return None,
            (None, ..) => {
                r.problem(
                    "CHASSIS_AUTH_ISSUER",
                    "required when any CHASSIS_AUTH_* is set",
                );
                return None;
            }
            (Some(i), ..) => i,
        };
        if audience.is_none() {
            r.problem("CHASSIS_AUTH_AUDIENCE", "required with CHASSIS_AUTH_ISSUER");
        }
        match (&jwks_url, &secret) {
            (None, None) => {
                if let Err(e) = super::jwks::discovery_url(&issuer).parse::<http::Uri>() {
                    r.problem(
                        "CHASSIS_AUTH_ISSUER",
                        format!("cannot be discovered (not a URL: {e}); set CHASSIS_AUTH_JWKS_URL"),
                    );
                }
            }
            (Some(_), Some(_)) => r.problem(
                "CHASSIS_AUTH_HS256_SECRET",
                "set either CHASSIS_AUTH_JWKS_URL or CHASSIS_AUTH_HS256_SECRET, not both",
            ),
            (None, Some(s)) if s.expose().len() < super::keys::MIN_HMAC_SECRET => {
                r.problem("CHASSIS_AUTH_HS256_SECRET", "must be at least 32 bytes");
            }
            _ => {}
        }
        Some(Self {
            issuer,
            audience: audience?,
            jwks_url,
            hs256_secret: secret,
            algorithms: algorithms.0,
            leeway: Duration::from_secs(leeway),
            max_lifetime: Duration::from_secs(max_lifetime),
        })
    }

    /// A verifier for these settings.
    ///
    /// # Errors
    ///
    /// If the settings cannot make a verifier (e.g. a short secret).
    pub fn verifier(&self) -> Result<Verifier, VerifierError> {
        let mut b = Verifier::builder()
            .leeway(self.leeway)
            .max_lifetime(self.max_lifetime);
        match (&self.jwks_url, &self.hs256_secret) {
            (Some(url), _) => {
                b = b
                    .algorithms(&self.algorithms)
                    .jwks(&self.issuer, &self.audience, url)
            }
            (None, Some(secret)) => {
                let key = Key::hmac(None, Algorithm::HS256, secret.expose().as_bytes())
                    .map_err(|e| VerifierError(vec![e.to_string()]))?;
                b = b
                    .algorithms(&[Algorithm::HS256])
                    .keys(&self.issuer, &self.audience, vec![key]);
            }
            (None, None) => {
                b = b
                    .algorithms(&self.algorithms)
                    .discover(&self.issuer, &self.audience)
            }
        }
        b.build()
    }
}

/// The header fields the pipeline reads. A derived struct refuses duplicate
/// members, so `{"alg":"RS256","alg":"none"}` is malformed, not "first wins".
#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    #[serde(default)]
    kid: Option<Value>,
    #[serde(default)]
    typ: Option<Value>,
    #[serde(default)]
    crit: Option<Value>,
}

/// The registered claims plus `perms` and `kind`, each kept as JSON so its
/// type can be judged here (a string `exp` is `bad_claim_type`, never
/// "absent"). Duplicate members are refused by the derive.
#[derive(Deserialize)]
struct RawClaims {
    #[serde(default)]
    sub: Option<Value>,
    #[serde(default)]
    iss: Option<Value>,
    #[serde(default)]
    aud: Option<Value>,
    #[serde(default)]
    exp: Option<Value>,
    #[serde(default)]
    nbf: Option<Value>,
    #[serde(default)]
    iat: Option<Value>,
    #[serde(default)]
    perms: Option<Value>,
    #[serde(default)]
    kind: Option<Value>,
}

/// A JSON number of seconds: a non-negative integer, or a finite
/// non-negative float below 2^63 (rounded down).
fn numeric_date(v: &Value) -> Result<u64, Reason> {
    if let Some(n) = v.as_u64() {
        return Ok(n);
    }
    match v.as_f64() {
        Some(f) if (0.0..9.2e18).contains(&f) => Ok(f as u64),
        _ => Err(Reason::BadClaimType),
    }
}

/// Parses a JSON object (a derived struct would also accept an array).
fn json_object<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Reason> {
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(Reason::Malformed);
    }
    serde_json::from_slice(bytes).map_err(|_| Reason::Malformed)
}

/// The token of a single `Authorization: Bearer <token>` header.
pub(crate) fn bearer(headers: &HeaderMap) -> Result<&str, Reason> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let value: &HeaderValue = match (values.next(), values.next()) {
        (None, _) => return Err(Reason::MissingToken),
        (Some(v), None) => v,
        (Some(_), Some(_)) => return Err(Reason::Malformed),
    };
    let bytes = value.as_bytes();
    if bytes.len() > MAX_AUTHORIZATION_LEN {
        return Err(Reason::TokenTooLarge);
    }
    if bytes.len() < 7 || !bytes[..7].eq_ignore_ascii_case(b"bearer ") {
        return Err(Reason::Malformed);
    }
    let token = &bytes[7..];
    let b64 = |c: &u8| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_';
    let mut dots = 0;
    for c in token {
        if *c == b'.' {
            dots += 1;
        } else if !b64(c) {
            return Err(Reason::Malformed);
        }
    }
    if dots != 2 {
        return Err(Reason::Malformed);
    }
    // Only ASCII was accepted above.
    std::str::from_utf8(token).map_err(|_| Reason::Malformed)
}

impl Verifier {
    /// A builder.
    pub fn builder() -> VerifierBuilder {
        VerifierBuilder::default()
    }

    /// Readiness checks, one per remote key set: up once a set is loaded.
    /// Running them warms the cache at start-up.
    pub fn health_checks(&self) -> Vec<(String, impl crate::health::Check + use<>, CheckOptions)> {
        self.remotes()
            .map(|(issuer, r)| {
                (
                    format!("jwks:{issuer}"),
                    JwksReady(r),
                    // Cheap once loaded (no fetch), so it can run often; it
                    // only fails again once the last good set is past the
                    // stale limit.
                    CheckOptions::default()
                        .timeout(Duration::from_secs(6))
                        .interval(Duration::from_secs(1))
                        .thresholds(3, 1),
                )
            })
            .collect()
    }

    fn remotes(&self) -> impl Iterator<Item = (&str, Arc<RemoteJwks>)> {
        self.inner.issuers.iter().filter_map(|i| match &i.keys {
            Keys::Remote(r) => Some((&*i.issuer, r.clone())),
            Keys::Static(_) => None,
        })
    }

    /// Background tasks keeping remote key sets fresh.
    pub fn refresh_tasks(
        &self,
    ) -> Vec<
        impl FnOnce(
            tokio_util::sync::CancellationToken,
        ) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>>
        + Send
        + use<>,
    > {
        self.remotes()
            .map(|(_, r)| {
                move |stop| -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> {
                    Box::pin(r.run(stop))
                }
            })
            .collect()
    }

    /// Verifies the bearer token of `headers` from the cache, without
    /// waiting: `None` when the token is not cached (call [`verify`](Self::verify)).
    pub fn verify_cached(&self, headers: &HeaderMap) -> Option<Result<Principal, AuthError>> {
        // The hit path skips the character scan of `bearer`: a cached token
        // was fully checked when it was inserted, and a hit compares it whole.
        let mut values = headers.get_all(AUTHORIZATION).iter();
        let value = match (values.next(), values.next()) {
            (Some(v), None) => v.as_bytes(),
            (None, _) => return Some(Err(AuthError::new(Reason::MissingToken))),
            (Some(_), Some(_)) => return Some(Err(AuthError::new(Reason::Malformed))),
        };
        if value.len() > MAX_AUTHORIZATION_LEN {
            return Some(Err(AuthError::new(Reason::TokenTooLarge)));
        }
        if value.len() < 7 || !value[..7].eq_ignore_ascii_case(b"bearer ") {
            return Some(Err(AuthError::new(Reason::Malformed)));
        }
        let now = self.inner.clock.now();
        self.inner
            .cache
            .get(&value[7..], now, |issuer| self.generation(issuer))
            .map(Ok)
    }

    fn generation(&self, issuer: &str) -> u64 {
        self.inner
            .issuers
            .iter()
            .find(|i| &*i.issuer == issuer)
            .map_or(0, |i| match &i.keys {
                Keys::Remote(r) => r.generation(),
                Keys::Static(_) => 0,
            })
    }

    /// Verifies the bearer token of `headers`.
    ///
    /// # Errors
    ///
    /// The reason the token is refused.
    pub async fn verify(&self, headers: &HeaderMap) -> Result<Principal, AuthError> {
        if let Some(hit) = self.verify_cached(headers) {
            return hit;
        }
        let token = bearer(headers).map_err(AuthError::new)?;
        self.verify_token(token).await.map_err(AuthError::new)
    }

    /// Verifies a raw token (no cache).
    ///
    /// # Errors
    ///
    /// The reason the token is refused.
    pub async fn verify_token(&self, token: &str) -> Result<Principal, Reason> {
        let (principal, generation) = self.verify_raw(token, self.inner.clock.now()).await?;
        self.inner.cache.insert(
            token.as_bytes(),
            &principal,
            generation,
            self.inner.clock.now(),
        );
        Ok(principal)
    }

    /// Verifies the bearer token of `headers` as of `at` (seconds since the
    /// epoch) rather than now: `exp`, `nbf` and `iat` are checked against
    /// `at`, with the verifier's leeway; everything else as
    /// [`verify`](Self::verify) does. For work that was authenticated when it
    /// was handed over and is done later, such as a message whose broker
    /// timestamp says when its publisher sent it (see
    /// [`messaging`](crate::messaging)). The cache is neither read nor
    /// filled.
    ///
    /// # Errors
    ///
    /// The reason the token is refused.
    pub async fn verify_at(&self, headers: &HeaderMap, at: u64) -> Result<Principal, AuthError> {
        let token = bearer(headers).map_err(AuthError::new)?;
        self.verify_raw(token, at)
            .await
            .map(|(principal, _)| principal)
            .map_err(AuthError::new)
    }

    /// Verifies a raw token as of `at`, without the cache: the principal and
    /// the generation of the key set that verified it.
    async fn verify_raw(&self, token: &str, at: u64) -> Result<(Principal, u64), Reason> {
        if token.len() > MAX_AUTHORIZATION_LEN {
            return Err(Reason::TokenTooLarge);
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Reason::Malformed);
        };
        if h.is_empty() || p.is_empty() {
            return Err(Reason::Malformed);
        }
        let header_json = URL_SAFE_NO_PAD.decode(h).map_err(|_| Reason::Malformed)?;
        let header: RawHeader = json_object(&header_json)?;
        let alg: Algorithm = header.alg.parse().map_err(|_| Reason::AlgNotAllowed)?;
        if !self.inner.algorithms.contains(&alg) {
            return Err(Reason::AlgNotAllowed);
        }
        if header.crit.is_some() {
            return Err(Reason::UnsupportedCrit);
        }
        match &header.typ {
            None => {}
            Some(Value::String(t))
                if ["jwt", "at+jwt", "application/at+jwt"]
                    .contains(&t.to_ascii_lowercase().as_str()) => {}
            Some(_) => return Err(Reason::BadTyp),
        }
        let kid = match &header.kid {
            None => None,
            Some(Value::String(k))
                if k.len() <= MAX_KID_LEN && k.bytes().all(|b| (0x21..0x7f).contains(&b)) =>
            {
                Some(k.as_str())
            }
            Some(_) => return Err(Reason::UnknownKid),
        };

        let payload = URL_SAFE_NO_PAD.decode(p).map_err(|_| Reason::Malformed)?;
        let claims: RawClaims = json_object(&payload)?;

        // Which issuer's keys: with one issuer, always its; with several, the
        // one the (not yet verified) token names.
        let issuer = match self.inner.issuers.as_slice() {
            [only] => only,
            all => {
                let named = claims.iss.as_ref().and_then(Value::as_str);
                all.iter()
                    .find(|i| Some(&*i.issuer) == named)
                    .ok_or(Reason::BadIssuer)?
            }
        };
        let (keys, generation) = match &issuer.keys {
            Keys::Static(k) => (k.clone(), 0),
            Keys::Remote(r) => r.keys_for(kid).await?,
        };
        let key = keys.select(kid, alg)?;
        let message = &token[..h.len() + 1 + p.len()];
        match jsonwebtoken::crypto::verify(s, message.as_bytes(), &key.key, alg) {
            Ok(true) => {}
            Ok(false) | Err(_) => return Err(Reason::BadSignature),
        }
        // Signature first, claims after: a forged token says bad_signature.
        let principal = self.check_claims(issuer, &claims, token, at)?;
        Ok((principal, generation))
    }

    fn check_claims(
        &self,
        issuer: &Issuer,
        c: &RawClaims,
        token: &str,
        now: u64,
    ) -> Result<Principal, Reason> {
        let leeway = self.inner.leeway;
        let (Some(exp), Some(iss), Some(aud), Some(sub)) = (&c.exp, &c.iss, &c.aud, &c.sub) else {
            return Err(Reason::MissingClaim);
        };
        if iss.as_str() != Some(&*issuer.issuer) {
            return Err(Reason::BadIssuer);
        }
        let audience_ok = match aud {
            Value::String(a) => *a == *issuer.audience,
            Value::Array(items) => items.iter().any(|a| a.as_str() == Some(&*issuer.audience)),
            _ => false,
        };
        if !audience_ok {
            return Err(Reason::BadAudience);
        }
        let subject = match sub {
            Value::String(s) if !s.is_empty() => s.as_str(),
            _ => return Err(Reason::BadClaimType),
        };
        let exp = numeric_date(exp)?;
        let nbf = c.nbf.as_ref().map(numeric_date).transpose()?;
        let iat = c.iat.as_ref().map(numeric_date).transpose()?;
        if now >= exp.saturating_add(leeway) {
            return Err(Reason::Expired);
        }
        if nbf.is_some_and(|nbf| nbf > now.saturating_add(leeway)) {
            return Err(Reason::NotYetValid);
        }
        if iat.is_some_and(|iat| iat > now.saturating_add(leeway)) {
            return Err(Reason::IatInFuture);
        }
        let start = iat.unwrap_or(now).min(now);
        if exp.saturating_sub(start) > self.inner.max_lifetime {
            return Err(Reason::LifetimeTooLong);
        }
        let grants = match &c.perms {
            None | Some(Value::Null) => Grants::default(),
            Some(Value::Array(items)) => {
                let strings: Option<Vec<&str>> = items.iter().map(Value::as_str).collect();
                let strings = strings.ok_or(Reason::BadClaimType)?;
                let (grants, rejected) =
                    Grants::from_claim(strings.iter().copied()).map_err(|e| {
                        tracing::warn!(subject, error = %e, "token refused for its grants");
                        Reason::BadClaimType
                    })?;
                for (index, error) in rejected {
                    tracing::warn!(subject, index, error = %error, "invalid grant ignored");
                }
                grants
            }
            Some(_) => return Err(Reason::BadClaimType),
        };
        let kind = match &c.kind {
            None => PrincipalKind::User,
            Some(Value::String(k)) if k == "user" => PrincipalKind::User,
            Some(Value::String(k)) if k == "service" => PrincipalKind::Service,
            Some(_) => return Err(Reason::BadClaimType),
        };
        Ok(Principal::new(
            subject,
            &issuer.issuer,
            kind,
            grants,
            exp,
            token,
        ))
    }
}

/// Verified tokens, keyed by a hash of the token's last [`KEY_TAIL`] bytes
/// and confirmed by comparing the whole token, so a hash collision can never
/// authenticate.
///
/// The tail is the end of the signature, which no one can choose for a token
/// that verifies (and only verified tokens are inserted), so it spreads the
/// keys as well as the whole token would; hashing it instead of the whole
/// token (often a kilobyte) keeps a hit cheap. The maps are keyed by that
/// hash already, so they hash it again with `foldhash`, not SipHash.
struct TokenCache {
    shards: Vec<Mutex<ShardMap>>,
    per_shard: usize,
    hasher: foldhash::fast::RandomState,
}

/// Bytes at the end of a token that its cache key is computed from.
const KEY_TAIL: usize = 32;

type ShardMap = HashMap<u64, Cached, foldhash::fast::FixedState>;

struct Cached {
    token: Box<[u8]>,
    principal: Principal,
    generation: u64,
}

impl TokenCache {
    fn new(capacity: usize) -> Self {
        Self {
            shards: (0..CACHE_SHARDS)
                .map(|_| Mutex::new(ShardMap::default()))
                .collect(),
            per_shard: capacity.div_ceil(CACHE_SHARDS),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    fn hash(&self, token: &[u8]) -> u64 {
        self.hasher
            .hash_one(&token[token.len().saturating_sub(KEY_TAIL)..])
    }

    fn shard(&self, hash: u64) -> std::sync::MutexGuard<'_, ShardMap> {
        self.shards[(hash >> 59) as usize % CACHE_SHARDS]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(&self, token: &[u8], now: u64, generation: impl Fn(&str) -> u64) -> Option<Principal> {
        if self.per_shard == 0 {
            return None;
        }
        let hash = self.hash(token);
        let mut shard = self.shard(hash);
        let entry = shard.get(&hash)?;
        if *entry.token != *token {
            return None;
        }
        // Valid no later than `exp`, and only while its key set still holds
        // every key it had.
        if now >= entry.principal.expires_at()
            || entry.generation != generation(entry.principal.issuer())
        {
            shard.remove(&hash);
            return None;
        }
        Some(entry.principal.clone())
    }

    fn insert(&self, token: &[u8], principal: &Principal, generation: u64, now: u64) {
        if self.per_shard == 0 || now >= principal.expires_at() {
            return;
        }
        let hash = self.hash(token);
        let mut shard = self.shard(hash);
        if shard.len() >= self.per_shard {
            shard.retain(|_, e| e.principal.expires_at() > now);
            if shard.len() >= self.per_shard {
                // Still full of live tokens: drop an arbitrary one.
                if let Some(k) = shard.keys().next().copied() {
                    shard.remove(&k);
                }
            }
        }
        shard.insert(
            hash,
            Cached {
                token: token.into(),
                principal: principal.clone(),
                generation,
            },
        );
    }
}
