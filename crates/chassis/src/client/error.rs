//! The errors of a downstream call.

use std::{sync::Arc, time::Duration};

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, StatusCode, header};

use super::{TokenError, transport};
use crate::{BoxError, bulkhead::BulkheadFull, circuit_breaker::CircuitOpen, problem::Problem};

/// Why a downstream call failed. Every variant names the downstream.
///
/// As a handler's error it becomes a problem+json answer that says what kind
/// of failure it was, never what the downstream said: 503 with
/// `Retry-After` when the downstream is known to be unavailable (circuit
/// open, bulkhead full, unreachable, it answered 503 or 429, no token could
/// be had), 504 for a timeout, 502 otherwise, with a `reason` member.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No answer in time: an attempt's timeout or the call's deadline.
    #[error("{downstream}: no answer within {after:?}")]
    Timeout {
        /// The downstream.
        downstream: Arc<str>,
        /// The time allowed.
        after: Duration,
    },
    /// The breaker is open: the downstream was not called.
    #[error("{downstream}: circuit open, retry in {retry_after:?}")]
    CircuitOpen {
        /// The downstream.
        downstream: Arc<str>,
        /// When the breaker lets a probe through.
        retry_after: Duration,
    },
    /// Too many calls in flight: the downstream was not called.
    #[error("{downstream}: bulkhead full")]
    BulkheadFull {
        /// The downstream.
        downstream: Arc<str>,
    },
    /// The connection could not be made, or broke before the answer.
    #[error("{downstream}: connection failed: {message}")]
    Connection {
        /// The downstream.
        downstream: Arc<str>,
        /// What failed.
        message: String,
    },
    /// The downstream answered with a status other than 2xx.
    #[error("{downstream} answered {status}")]
    Status {
        /// The downstream.
        downstream: Arc<str>,
        /// The status.
        status: StatusCode,
        /// Its problem+json body, when it sent one.
        problem: Option<Box<RemoteProblem>>,
        /// The raw body.
        body: Bytes,
    },
    /// The answer could not be read or parsed.
    #[error("{downstream}: bad response: {message}")]
    Decode {
        /// The downstream.
        downstream: Arc<str>,
        /// What was wrong.
        message: String,
    },
    /// No token could be had for [`as_service`](super::Downstream::as_service).
    #[error("{downstream}: no service token: {source}")]
    Token {
        /// The downstream.
        downstream: Arc<str>,
        /// Why.
        source: TokenError,
    },
    /// [`on_behalf_of`](super::Downstream::on_behalf_of) was used without an
    /// authenticated caller.
    #[error("{downstream}: no caller token to forward")]
    NoCallerToken {
        /// The downstream.
        downstream: Arc<str>,
    },
    /// The request could not be built (a bad path or header).
    #[error("{downstream}: invalid request: {message}")]
    InvalidRequest {
        /// The downstream.
        downstream: Arc<str>,
        /// What was wrong.
        message: String,
    },
}

/// A problem+json body (RFC 9457) received from a downstream.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[non_exhaustive]
pub struct RemoteProblem {
    /// `type`.
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    /// `title`.
    #[serde(default)]
    pub title: Option<String>,
    /// `status`.
    #[serde(default)]
    pub status: Option<u16>,
    /// `detail`.
    #[serde(default)]
    pub detail: Option<String>,
    /// `correlation_id`.
    #[serde(default)]
    pub correlation_id: Option<String>,
    /// Every other member.
    #[serde(flatten)]
    pub members: serde_json::Map<String, serde_json::Value>,
}

impl ClientError {
    /// The downstream's name.
    pub fn downstream(&self) -> &str {
        match self {
            Self::Timeout { downstream, .. }
            | Self::CircuitOpen { downstream, .. }
            | Self::BulkheadFull { downstream }
            | Self::Connection { downstream, .. }
            | Self::Status { downstream, .. }
            | Self::Decode { downstream, .. }
            | Self::Token { downstream, .. }
            | Self::NoCallerToken { downstream }
            | Self::InvalidRequest { downstream, .. } => downstream,
        }
    }

    /// The downstream's status, for [`ClientError::Status`].
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The downstream's problem document, for a [`ClientError::Status`]
    /// whose body was problem+json.
    pub fn remote_problem(&self) -> Option<&RemoteProblem> {
        match self {
            Self::Status {
                problem: Some(p), ..
            } => Some(p),
            _ => None,
        }
    }

    /// The `reason` member of the downstream's problem (`sold_out`,
    /// `invalid_fields`, ...), the code a caller branches on; `None` for
    /// any other error.
    ///
    /// ```
    /// # use chassis::client::ClientError;
    /// fn retry_later(e: &ClientError) -> bool {
    ///     e.is_unavailable() || e.reason() == Some("storage_unavailable")
    /// }
    /// ```
    pub fn reason(&self) -> Option<&str> {
        self.remote_problem()?.members.get("reason")?.as_str()
    }

    /// Whether the downstream is known to be unavailable for now (open
    /// breaker, full bulkhead, unreachable, a 503 or 429 answer, no token).
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::CircuitOpen { .. }
            | Self::BulkheadFull { .. }
            | Self::Token { .. }
            | Self::Connection { .. } => true,
            Self::Status { status, .. } => {
                *status == StatusCode::SERVICE_UNAVAILABLE
                    || *status == StatusCode::TOO_MANY_REQUESTS
            }
            _ => false,
        }
    }

    pub(super) fn from_status(
        downstream: &Arc<str>,
        status: StatusCode,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Self {
        let json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| {
                let ct = ct.split(';').next().unwrap_or("").trim();
                ct.eq_ignore_ascii_case(crate::problem::CONTENT_TYPE)
                    || ct.eq_ignore_ascii_case("application/json")
            });
        let problem = json
            .then(|| serde_json::from_slice::<RemoteProblem>(&body).ok())
            .flatten()
            .map(Box::new);
        Self::Status {
            downstream: downstream.clone(),
            status,
            problem,
            body,
        }
    }

    pub(super) fn from_stack(downstream: &Arc<str>, e: &BoxError) -> Self {
        let downstream = downstream.clone();
        if let Some(open) = e.downcast_ref::<CircuitOpen>() {
            return Self::CircuitOpen {
                downstream,
                retry_after: open.retry_after(),
            };
        }
        if e.is::<BulkheadFull>() {
            return Self::BulkheadFull { downstream };
        }
        if let Some(t) = e.downcast_ref::<transport::AttemptTimedOut>() {
            return Self::Timeout {
                downstream,
                after: t.0,
            };
        }
        if let Some(unsent) = e.downcast_ref::<crate::retry::NotSent>() {
            return Self::from_stack(&downstream, unsent.error());
        }
        if let Some(t) = e.downcast_ref::<transport::TransportError>() {
            return match t {
                transport::TransportError::Connect(message)
                | transport::TransportError::Connection(message) => Self::Connection {
                    downstream,
                    message: message.clone(),
                },
                transport::TransportError::Body(message) => Self::Decode {
                    downstream,
                    message: message.clone(),
                },
            };
        }
        Self::Connection {
            downstream,
            message: e.to_string(),
        }
    }

    /// The problem a server answers with when this error ends a request.
    pub fn problem(&self) -> Problem {
        let (status, reason, detail) = match self {
            Self::Timeout { .. } => (
                StatusCode::GATEWAY_TIMEOUT,
                "downstream_timeout",
                "A service this request depends on did not answer in time.",
            ),
            e if e.is_unavailable() => (
                StatusCode::SERVICE_UNAVAILABLE,
                "downstream_unavailable",
                "A service this request depends on is unavailable; retry later.",
            ),
            Self::NoCallerToken { .. } | Self::InvalidRequest { .. } => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "The request could not be completed.",
            ),
            _ => (
                StatusCode::BAD_GATEWAY,
                "downstream_error",
                "A service this request depends on failed.",
            ),
        };
        let mut problem = Problem::new(status)
            .with_detail(detail)
            .with_member("reason", reason);
        if status == StatusCode::SERVICE_UNAVAILABLE {
            let secs = match self {
                Self::CircuitOpen { retry_after, .. } => {
                    retry_after.as_secs_f64().ceil().max(1.0) as u64
                }
                _ => 1,
            };
            problem = problem.with_header(header::RETRY_AFTER, secs.into());
        }
        // Fixed texts of the chassis' own: they may reach the client.
        problem.vetted()
    }
}

impl IntoResponse for ClientError {
    fn into_response(self) -> Response {
        self.problem().into_response()
    }
}
