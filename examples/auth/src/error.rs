//! Errors: why the service could not start or an operation failed
//! internally ([`AppError`]), and the token endpoint's OAuth 2.0 error
//! answers ([`OAuthError`], RFC 6749 §5.2).

use axum::{
    Json,
    response::{IntoResponse, Response},
};
use chassis::Problem;
use http::{HeaderValue, StatusCode, header};

use crate::client::TokenErrorResponse;

/// Why the service could not start, or an operation failed inside it.
///
/// Never sent to a client: handlers log it once and answer a 500 problem
/// document without details.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppError {
    /// The database could not be opened or migrated.
    #[error(transparent)]
    Database(#[from] chassis::db::DbError),
    /// A query failed.
    #[error("database query failed: {0}")]
    Query(#[from] sqlx::Error),
    /// Stored data could not be read (a corrupt row).
    #[error("stored data is unusable: {0}")]
    Data(String),
    /// Hashing, key generation, signing or randomness failed.
    #[error("cryptography failed: {0}")]
    Crypto(String),
    /// The grants (`AUTH_GRANTS_FILE`, `AUTH_SEED_DEMO`) have problems,
    /// each listed.
    #[error("the grants are not valid ({} problems): {}", .0.len(), .0.join("; "))]
    Grants(Vec<String>),
    /// The verifier for the service's own tokens could not be built.
    #[error(transparent)]
    Verifier(#[from] chassis::auth::VerifierError),
}

impl From<crate::password::HashError> for AppError {
    fn from(e: crate::password::HashError) -> Self {
        Self::Crypto(e.to_string())
    }
}

/// `Cache-Control: no-store` and `Pragma: no-cache`, as RFC 6749 §5.1 asks
/// of every token endpoint answer.
pub(crate) fn no_store(mut res: Response) -> Response {
    let headers = res.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    res
}

/// Logs an internal failure once and answers a 500 problem document that
/// says nothing about it.
pub(crate) fn internal(what: &'static str, error: &AppError) -> Problem {
    tracing::error!(error = %error, "{what}");
    Problem::internal()
}

/// An error answer of the token endpoint: RFC 6749 §5.2 JSON with a fixed
/// description (never an echo of the request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OAuthError {
    status: StatusCode,
    code: &'static str,
    description: Option<&'static str>,
    /// Seconds for `Retry-After`.
    retry_after: Option<u64>,
}

impl OAuthError {
    /// 400 `invalid_request`: a missing, repeated or malformed parameter.
    pub(crate) const fn invalid_request(description: &'static str) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_request",
            description: Some(description),
            retry_after: None,
        }
    }

    /// 400 `invalid_grant`: the credentials or refresh token are not valid.
    pub(crate) const fn invalid_grant(description: &'static str) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_grant",
            description: Some(description),
            retry_after: None,
        }
    }

    /// 400 `invalid_scope`: the scope asks for more than the subject has.
    pub(crate) const fn invalid_scope(description: &'static str) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_scope",
            description: Some(description),
            retry_after: None,
        }
    }

    /// 400 `invalid_target` (RFC 8707 §2): an audience that is not a known
    /// service.
    pub(crate) const fn invalid_target(description: &'static str) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_target",
            description: Some(description),
            retry_after: None,
        }
    }

    /// 400 `unauthorized_client`: the client may not use this grant (here,
    /// exchange tokens for that audience).
    pub(crate) const fn unauthorized_client(description: &'static str) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "unauthorized_client",
            description: Some(description),
            retry_after: None,
        }
    }

    /// 400 `unsupported_grant_type`.
    pub(crate) const fn unsupported_grant_type() -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "unsupported_grant_type",
            description: Some(
                "supported grant types: password, client_credentials, refresh_token, \
                 urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            retry_after: None,
        }
    }

    /// 429 `slow_down` (RFC 8628 §3.5, registered for the token endpoint)
    /// with `Retry-After`: too many failed logins.
    pub(crate) const fn throttled(retry_after: u64) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            code: "slow_down",
            description: Some("too many failed attempts; retry later"),
            retry_after: Some(retry_after),
        }
    }

    /// 503 with `Retry-After: 1`: no hashing slot freed up in time. The
    /// client sees the chassis' generic 503 problem with this
    /// `Retry-After` (no 5xx body of a handler reaches a client).
    pub(crate) const fn busy() -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "temporarily_unavailable",
            description: Some("the service is busy; retry later"),
            retry_after: Some(1),
        }
    }

    /// 401 `invalid_client` with `WWW-Authenticate: Basic realm="auth"`.
    pub(crate) const fn invalid_client() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            code: "invalid_client",
            description: None,
            retry_after: None,
        }
    }

    /// The OAuth error code.
    #[cfg(test)]
    pub(crate) fn code(&self) -> &'static str {
        self.code
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let body = TokenErrorResponse {
            error: self.code.to_owned(),
            error_description: self.description.map(str::to_owned),
        };
        let mut res = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"auth\""),
            );
        }
        no_store(res)
    }
}
