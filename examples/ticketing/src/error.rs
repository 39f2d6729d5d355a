//! Errors: why the service could not start, and why a request was refused.

use axum::response::{IntoResponse, Response};
use chassis::{Problem, validation::Invalid};
use http::StatusCode;

use crate::client::ReservationStatus;

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppError {
    /// The database could not be opened or migrated.
    #[error(transparent)]
    Database(#[from] chassis::db::DbError),
    /// The consumer of `reservation.confirm` could not be set up.
    #[error("messaging: {0}")]
    Messaging(String),
}

/// Why a request was refused. Each becomes a problem+json answer; the
/// database's own errors are logged here, once, and never sent.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    /// 422: the body's fields that are not valid, each named.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// 400: an `Idempotency-Key` outside its grammar.
    #[error("the Idempotency-Key header is not valid")]
    InvalidIdempotencyKey,
    /// 422: the key was used in this account for a different reservation.
    #[error("the Idempotency-Key was used for another request")]
    IdempotencyKeyReused,
    /// 404: no such resource (`"ticket"`, `"reservation"`: the kind, as the
    /// detail names it) in this account, whether or not it exists in
    /// another.
    #[error("no such {0} in the account")]
    NotFound(&'static str),
    /// 409: fewer places left than asked for.
    #[error("sold out: {available} places left")]
    SoldOut { available: u32 },
    /// 409: the reservation's status does not allow the change.
    #[error("the reservation is {0}")]
    NotHeld(ReservationStatus),
    /// 503 when the database is busy, 500 otherwise (the chassis' mapping);
    /// logged, never sent.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// 500: a value that does not convert to or from its stored form.
    #[error("stored data: {0}")]
    Stored(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem = match self {
            Self::Invalid(invalid) => invalid.into(),
            Self::InvalidIdempotencyKey => Problem::new(StatusCode::BAD_REQUEST)
                .with_detail("The Idempotency-Key must be 1 to 255 of A-Z a-z 0-9 . _ ~ : -")
                .with_member("reason", "invalid_idempotency_key"),
            Self::IdempotencyKeyReused => Problem::new(StatusCode::UNPROCESSABLE_ENTITY)
                .with_detail("This Idempotency-Key was used for a different reservation.")
                .with_member("reason", "idempotency_key_reused"),
            // The same answer whether the resource does not exist or belongs
            // to another account: existence is never revealed.
            Self::NotFound(kind) => {
                Problem::not_found().with_detail(format!("The account has no such {kind}."))
            }
            Self::SoldOut { available } => Problem::new(StatusCode::CONFLICT)
                .with_detail("Not enough places are left for this reservation.")
                .with_member("reason", "sold_out")
                .with_member("available", available),
            Self::NotHeld(status) => Problem::new(StatusCode::CONFLICT)
                .with_detail(format!("The reservation is {status}."))
                .with_member("reason", format!("reservation_{status}")),
            Self::Database(e) => chassis::db::problem(&e),
            Self::Stored(e) => {
                tracing::error!(error = %e, "unreadable stored data");
                Problem::internal()
            }
        };
        problem.into_response()
    }
}
