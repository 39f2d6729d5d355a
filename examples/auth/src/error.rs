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
    Database(#[from] chassis::sqlite::DbError),
    /// A query failed.
    #[error("database query failed: {0}")]
    Query(#[from] sqlx::Error),
    /// Stored data could not be read (a corrupt row).
    #[error("stored data is unusable: {0}")]
    Data(String),
    /// Hashing, key generation, signing or randomness failed.
    #[error("cryptography failed: {0}")]
    Crypto(String),
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
}

impl OAuthError {
    /// 400 `invalid_request`: a missing, repeated or malformed parameter.
    pub(crate) const fn invalid_request(description: &'static str) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_request",
            description: Some(description),
        }
    }

    /// 400 `invalid_grant`: the credentials or refresh token are not valid.
    pub(crate) const fn invalid_grant(description: &'static str) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_grant",
            description: Some(description),
        }
    }

    /// 400 `invalid_scope`: the scope asks for more than the subject has.
    pub(crate) const fn invalid_scope(description: &'static str) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_scope",
            description: Some(description),
        }
    }

    /// 400 `unsupported_grant_type`.
    pub(crate) const fn unsupported_grant_type() -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "unsupported_grant_type",
            description: Some("supported grant types: password, client_credentials, refresh_token"),
        }
    }

    /// 401 `invalid_client` with `WWW-Authenticate: Basic realm="auth"`.
    pub(crate) const fn invalid_client() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            code: "invalid_client",
            description: None,
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
        if self.status == StatusCode::UNAUTHORIZED {
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"auth\""),
            );
        }
        no_store(res)
    }
}
