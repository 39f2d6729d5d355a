//! Authentication: every API call carries a verified bearer token.
//!
//! # The standard
//!
//! Every API route of every service authenticates its caller, unless it is
//! explicitly marked public. Callers present a JWT (`Authorization: Bearer
//! <jwt>`) issued by a trusted issuer, and the service verifies it locally
//! with the issuer's public keys, so no call waits on the issuer. A token is
//! accepted only when all of this holds, checked in this order:
//!
//! 1. exactly one `Authorization` header, scheme `Bearer` (any case), one
//!    space, a token of three base64url segments, at most 8 KiB in all
//!    (larger values are refused before any decoding);
//! 2. a JSON header without `crit` (no extension is supported), with an
//!    `alg` the key allows and a `typ`, if any, of `JWT` or `at+jwt`; `jku`,
//!    `x5u`, `jwk` and `x5c` are never followed;
//! 3. a key chosen by `kid` from the issuer's key set: the **key** decides
//!    the algorithms it verifies (its JWK `alg`, its type and curve, the
//!    configured allow-list, default `EdDSA,ES256,RS256`), never the token;
//!    symmetric keys come only from explicit configuration (at least 32
//!    bytes), never from a key set; a `kid` shared by two keys is refused;
//! 4. a valid signature (checked **before** any claim, so a forged token is
//!    always `bad_signature`);
//! 5. claims: `iss` equal to the issuer, `aud` naming this service, `sub` a
//!    non-empty string, `exp` in the future, `nbf` and `iat` (when present)
//!    not in the future, with the configured leeway (default 30 s); numeric
//!    dates must be numbers (a string `exp` is refused, not ignored); the
//!    lifetime `exp - iat` is at most 24 h; `perms` is an array of grant
//!    strings (see [`permission`](crate::permission)).
//!
//! A failure answers **401** `application/problem+json` with a `reason` code
//! (below) and `WWW-Authenticate: Bearer error="invalid_token"` (without
//! the `error` attribute when no token was sent, as RFC 6750 asks). The body
//! never holds the token, a key or a library message. When the issuer's keys
//! were never loaded, the answer is **503** `jwks_unavailable` with
//! `Retry-After`: the caller's retry may well succeed.
//!
//! | reason | meaning |
//! |---|---|
//! | `missing_token` | no `Authorization` header |
//! | `malformed` | not a `Bearer` token of three base64url segments of JSON, or two headers |
//! | `token_too_large` | the header is longer than 8 KiB |
//! | `alg_not_allowed` | `none`, an unknown `alg`, or one the key does not allow |
//! | `bad_signature` | the signature does not verify |
//! | `unknown_kid` | no key (or two keys) with that `kid`, after at most one refresh |
//! | `expired`, `not_yet_valid`, `iat_in_future` | time checks |
//! | `lifetime_too_long` | `exp - iat` above the maximum |
//! | `missing_claim` | `exp`, `iss`, `aud` or `sub` missing |
//! | `bad_claim_type` | a claim of the wrong type, or an invalid grant containing `!` (a deny written wrongly) |
//! | `bad_issuer`, `bad_audience` | not our issuer, not for us |
//! | `unsupported_crit`, `bad_typ` | header policies |
//! | `jwks_unavailable` | the issuer's keys were never loaded (503) |
//!
//! Keys come from the issuer's key set (fetched at start-up, readiness down
//! until the first set loads, refreshed in the background, see
//! [`JwksOptions`]) or from fixed keys. The key set's URL is configured
//! (`CHASSIS_AUTH_JWKS_URL`) or, with the issuer alone, found by **OpenID
//! Connect Discovery**: `{issuer}/.well-known/openid-configuration`, whose
//! `issuer` must equal the configured issuer exactly (else no key is
//! trusted, readiness stays down and the log says why), and whose
//! `jwks_uri` is then fetched. Both travel over verified TLS (see
//! [`tls`](crate::tls)); plain `http://` is for loopback and sidecars. A verified token is cached (by a hash of the whole token,
//! confirmed by comparing the whole token, never past its `exp`, dropped when
//! its key leaves the set), so a caller repeating one token pays a lookup,
//! not a signature check.
//!
//! # How the chassis does it
//!
//! Build a [`Verifier`] from [`AuthConfig`] (the `CHASSIS_AUTH_*` variables)
//! or with [`Verifier::builder`], and give it to the service builder; every
//! route that requires a permission then authenticates. Handlers extract the
//! [`Principal`].
//!
//! Verification is the `jwt` feature (on by default; it brings
//! jsonwebtoken, and outbound TLS to fetch key sets). Without it this module
//! keeps [`Principal`], [`AuthError`] and [`Reason`], so handlers, audit and
//! permission checks compile unchanged, but nothing can verify a token: a
//! service built so may only have public API routes (a route that requires a
//! permission fails the build, naming the feature), and `CHASSIS_AUTH_*`
//! set in its environment is a configuration problem.
//!
//! # Example
//!
//! ```
//! # #[cfg(feature = "jwt")]
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use chassis::auth::{Key, Verifier, ManualClock};
//! use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
//!
//! let secret = b"an HMAC secret of at least 32 bytes!";
//! let verifier = Verifier::builder()
//!     .algorithms(&[Algorithm::HS256])
//!     .keys("https://auth.example", "ticketing", vec![Key::hmac(None, Algorithm::HS256, secret).unwrap()])
//!     .clock(ManualClock::new(1_000_000))
//!     .build()
//!     .unwrap();
//! let claims = serde_json::json!({
//!     "iss": "https://auth.example", "aud": "ticketing", "sub": "ann",
//!     "iat": 1_000_000, "exp": 1_000_900, "perms": ["ticketing:67000001:view:ticket"],
//! });
//! let key = EncodingKey::from_secret(secret).unwrap();
//! let token = encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap();
//! let principal = verifier.verify_token(&token).await.unwrap();
//! assert_eq!(principal.subject(), "ann");
//! assert_eq!(principal.grants().len(), 1);
//! assert_eq!(format!("{principal:?}").contains(&token), false, "the token never prints");
//!
//! let forged = format!("{}x", &token[..token.len() - 1]);
//! assert_eq!(verifier.verify_token(&forged).await.unwrap_err().code(), "bad_signature");
//! # }
//! # #[cfg(not(feature = "jwt"))]
//! # fn main() {}
//! ```

#[cfg(feature = "jwt")]
mod jwks;
#[cfg(feature = "jwt")]
mod keys;
#[cfg(feature = "jwt")]
mod verify;

use std::fmt;

use axum::{
    extract::FromRequestParts,
    response::{IntoResponse, Response},
};
use http::{HeaderValue, StatusCode, header, request::Parts};

#[cfg(feature = "jwt")]
#[cfg_attr(docsrs, doc(cfg(feature = "jwt")))]
pub use jwks::JwksOptions;
#[cfg(feature = "jwt")]
#[cfg_attr(docsrs, doc(cfg(feature = "jwt")))]
pub use keys::{DEFAULT_ALGORITHMS, Key, KeyError, KeySet, MIN_HMAC_SECRET};
#[cfg(feature = "jwt")]
#[cfg_attr(docsrs, doc(cfg(feature = "jwt")))]
pub use verify::{
    AuthConfig, Clock, DEFAULT_CACHE_CAPACITY, MAX_AUTHORIZATION_LEN, ManualClock, SystemClock,
    Verifier, VerifierBuilder, VerifierError,
};

/// Stands in for the token verifier when the `jwt` feature is off. It has
/// no values, so the route guard and the readiness endpoint, which hold an
/// `Option<Verifier>`, always hold `None`, and their code is the same in
/// every build.
#[cfg(not(feature = "jwt"))]
#[derive(Debug, Clone)]
pub(crate) struct Verifier(std::convert::Infallible);

#[cfg(not(feature = "jwt"))]
impl Verifier {
    /// Never called: there is no verifier to call it on.
    pub(crate) fn verify_cached(
        &self,
        _headers: &http::HeaderMap,
    ) -> Option<Result<Principal, AuthError>> {
        match self.0 {}
    }

    /// Never called: there is no verifier to call it on.
    pub(crate) async fn verify(&self, _headers: &http::HeaderMap) -> Result<Principal, AuthError> {
        match self.0 {}
    }
}

pub use crate::context::{Principal, PrincipalKind};
use crate::problem::Problem;

/// `Retry-After` seconds with `jwks_unavailable`.
const JWKS_RETRY_AFTER_SECS: u32 = 5;

/// Why a request was not authenticated (or not authorised): the contract's
/// reason codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// No `Authorization` header.
    MissingToken,
    /// Not a well-formed bearer JWT.
    Malformed,
    /// `Authorization` longer than 8 KiB.
    TokenTooLarge,
    /// An algorithm the key does not allow.
    AlgNotAllowed,
    /// The signature does not verify.
    BadSignature,
    /// No single key with that `kid`.
    UnknownKid,
    /// `exp` has passed.
    Expired,
    /// `nbf` is in the future.
    NotYetValid,
    /// `iat` is in the future.
    IatInFuture,
    /// `exp - iat` is above the maximum.
    LifetimeTooLong,
    /// A required claim is missing.
    MissingClaim,
    /// A claim has the wrong type, or `perms` holds an invalid grant that
    /// contains `!` (a deny written wrongly).
    BadClaimType,
    /// Not a trusted issuer.
    BadIssuer,
    /// Not addressed to this service.
    BadAudience,
    /// The header has `crit`.
    UnsupportedCrit,
    /// A `typ` other than `JWT` or `at+jwt`.
    BadTyp,
    /// The issuer's keys were never loaded (503).
    JwksUnavailable,
    /// Authenticated, but the permission is not granted (403).
    Forbidden,
}

impl Reason {
    /// The reason code.
    pub fn code(self) -> &'static str {
        match self {
            Self::MissingToken => "missing_token",
            Self::Malformed => "malformed",
            Self::TokenTooLarge => "token_too_large",
            Self::AlgNotAllowed => "alg_not_allowed",
            Self::BadSignature => "bad_signature",
            Self::UnknownKid => "unknown_kid",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::IatInFuture => "iat_in_future",
            Self::LifetimeTooLong => "lifetime_too_long",
            Self::MissingClaim => "missing_claim",
            Self::BadClaimType => "bad_claim_type",
            Self::BadIssuer => "bad_issuer",
            Self::BadAudience => "bad_audience",
            Self::UnsupportedCrit => "unsupported_crit",
            Self::BadTyp => "bad_typ",
            Self::JwksUnavailable => "jwks_unavailable",
            Self::Forbidden => "forbidden",
        }
    }

    /// The status it answers with.
    pub fn status(self) -> StatusCode {
        match self {
            Self::JwksUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Forbidden => StatusCode::FORBIDDEN,
            _ => StatusCode::UNAUTHORIZED,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A refused authentication; answers 401 (or 503) problem+json.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("authentication failed: {reason}")]
pub struct AuthError {
    reason: Reason,
}

impl AuthError {
    /// An error for `reason`.
    pub fn new(reason: Reason) -> Self {
        Self { reason }
    }

    /// The reason.
    pub fn reason(&self) -> Reason {
        self.reason
    }

    /// The reason code.
    pub fn code(&self) -> &'static str {
        self.reason.code()
    }
}

impl Reason {
    /// The problem document for this reason. Its content is the chassis'
    /// own, so a 503 `jwks_unavailable` keeps it (see
    /// [`problem`](crate::problem)); setting its `detail` or a member clears
    /// that.
    pub fn problem(self) -> Problem {
        let problem = Problem::new(self.status()).with_member("reason", self.code());
        let problem = match self {
            Self::JwksUnavailable => problem
                .with_detail("The service cannot verify tokens right now; retry later.")
                .with_header(
                    header::RETRY_AFTER,
                    HeaderValue::from(JWKS_RETRY_AFTER_SECS),
                ),
            Self::MissingToken => problem
                .with_detail("This operation needs a bearer token.")
                .with_header(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")),
            Self::Forbidden => problem,
            _ => problem
                .with_detail("The bearer token was refused.")
                .with_header(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                ),
        };
        problem.vetted()
    }
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        self.reason.problem().into_response()
    }
}

/// Extracts the caller authenticated by the chassis; 401 when the route is
/// public and no token was verified.
impl<S: Send + Sync> FromRequestParts<S> for Principal {
    type Rejection = AuthError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        crate::context::authorized(&parts.extensions)
            .map(|(principal, _)| principal)
            .ok_or(AuthError::new(Reason::MissingToken))
    }
}

#[cfg(test)]
mod tests;
