//! The context of one request: [`RequestContext`].
//!
//! # The standard
//!
//! Every step of the request path (correlation, problem, observation, audit,
//! shedding, body limit, timeout, guard, panic) works on the same few facts
//! about a request, and each fact is established once:
//!
//! * its ids: the [`CorrelationId`] and the W3C [`TraceContext`] (see
//!   [`correlation`](crate::correlation) for their rules);
//! * when it was received: one clock reading from which the access line, the
//!   audit event and the timeout all count;
//! * how long the caller will still wait (`x-timeout-ms`, see
//!   [`protect`](crate::protect)), and the deadline the timeout step sets
//!   from it and the server's own timeout;
//! * who called (the [`Principal`], once a token verified) and what was
//!   decided about the call ([`AuditDecision`], with the account and
//!   permission it was checked for).
//!
//! # How the chassis does it
//!
//! The facts live in one request extension, a [`RequestContext`]. It belongs
//! to no layer: this module imports none, and each step reads and writes the
//! context through its own few methods:
//!
//! | step | reads | writes |
//! |---|---|---|
//! | correlation | | makes the context from the request's headers |
//! | problem | the id | |
//! | observation | the ids, when received | |
//! | audit | the id, when received, the decision | opens the decision note |
//! | timeout | when received, the caller's timeout | the deadline |
//! | guard | | the principal, account, permission and decision |
//! | handler extractors | everything | a handler's own denial ([`Authz`](crate::api::Authz)) |
//!
//! Whichever step comes first makes the context from the request's headers,
//! so a layer used without the correlation layer outside it sees the same
//! facts (the ids it makes are then not returned on the response, which is
//! the correlation layer's job).
//!
//! # Example
//!
//! ```
//! use axum::{Router, body::Body, routing::get};
//! use chassis::{context::RequestContext, correlation::SetCorrelationIdLayer};
//! use http::Request;
//! use tower::ServiceExt;
//!
//! async fn handler(ctx: RequestContext) -> String {
//!     format!("{} {:?}", ctx.id(), ctx.caller_timeout())
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let app = Router::new().route("/", get(handler)).layer(SetCorrelationIdLayer::new());
//! let req = Request::get("/")
//!     .header("x-correlation-id", "order-42")
//!     .header("x-timeout-ms", "250")
//!     .body(Body::empty())
//!     .unwrap();
//! let res = app.oneshot(req).await.unwrap();
//! let body = chassis::problem::body_bytes(res.into_body()).await;
//! assert_eq!(body, "order-42 Some(250ms)");
//! # }
//! ```

use std::{convert::Infallible, fmt, time::Duration};

use axum::extract::FromRequestParts;
use http::{HeaderMap, Request, request::Parts};
use tokio::time::Instant;

pub(crate) mod ids;
#[cfg(feature = "otel")]
pub(crate) use ids::set_sampling;
mod note;
mod principal;

pub use ids::{
    CorrelationId, HexId, MAX_LEN, TRACEPARENT, TRACESTATE, TraceContext, X_CORRELATION_ID,
};
pub use note::AuditDecision;
pub(crate) use note::{AuditNote, authorized};
pub use principal::{Principal, PrincipalKind};

use ids::{Rejected, Wanted};

/// `x-timeout-ms`: how many milliseconds the caller will still wait.
pub const X_TIMEOUT_MS: http::HeaderName = http::HeaderName::from_static("x-timeout-ms");

/// What the chassis knows about one request; see the [module docs](self).
///
/// Cheap to clone (the ids are reference counted, the note is shared).
/// Handlers can extract it; outside the chassis stack they get a fresh one.
#[derive(Clone)]
pub struct RequestContext {
    id: CorrelationId,
    trace: TraceContext,
    /// One clock reading for the steps that measure the request.
    received: Instant,
    /// The caller's `x-timeout-ms`.
    caller_timeout: Option<Duration>,
    /// When the request must be answered, once the timeout step set it.
    deadline: Option<Instant>,
    /// The decision note, opened by the first step that records or reads
    /// a decision (the audit step, or the guard without one).
    note: Option<AuditNote>,
}

// === impl RequestContext ===

impl RequestContext {
    /// A context for work that did not come from a request, such as a
    /// background job continuing what a request started (pass the id stored
    /// with the job) or a scheduled task (pass [`CorrelationId::generate`]).
    pub fn new(id: CorrelationId, trace: TraceContext) -> Self {
        Self {
            id,
            trace,
            received: Instant::now(),
            caller_timeout: None,
            deadline: None,
            note: None,
        }
    }

    /// The context of a request with `headers`, received now: its valid
    /// `x-correlation-id` or a fresh one, its trace continued or a new one,
    /// and the caller's `x-timeout-ms`.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        // A request that comes with neither id gets one UUIDv7 for both: its
        // 128 bits are the new trace's id (version and variant bits included,
        // the last 7 bytes random as W3C Trace Context asks), so a search by
        // either id finds the other, and one random draw serves both.
        let wanted = Wanted::scan(headers);
        let (id, root) = match CorrelationId::from_seen(wanted.correlation_id) {
            Ok(id) => (id, None),
            Err(rejected) => {
                let (id, uuid) = CorrelationId::generate_uuid();
                if let Rejected::Invalid(value) = rejected {
                    tracing::debug!(
                        correlation_id_rejected = true,
                        sample = %ids::sample(value),
                        replacement = %id,
                        "invalid x-correlation-id replaced"
                    );
                }
                (id, Some(uuid))
            }
        };
        let trace = TraceContext::from_seen(wanted.traceparent, headers, root);
        let mut ctx = Self::new(id, trace);
        ctx.caller_timeout = caller_timeout_of(wanted.timeout_ms.once());
        ctx
    }

    /// Runs `f` on the context of `req`, made from its headers and inserted
    /// first when no step made it yet: one lookup when it is there.
    #[inline]
    pub(crate) fn with<B, R>(req: &mut Request<B>, f: impl FnOnce(&mut Self) -> R) -> R {
        if let Some(ctx) = req.extensions_mut().get_mut::<Self>() {
            return f(ctx);
        }
        let mut ctx = Self::from_headers(req.headers());
        let r = f(&mut ctx);
        req.extensions_mut().insert(ctx);
        r
    }

    /// The correlation id.
    #[inline]
    pub fn id(&self) -> &CorrelationId {
        &self.id
    }

    /// The trace context.
    #[inline]
    pub fn trace(&self) -> &TraceContext {
        &self.trace
    }

    /// When the request was received (or the context made).
    #[inline]
    pub fn received(&self) -> Instant {
        self.received
    }

    /// How long the caller said it would still wait when the request came
    /// (`x-timeout-ms`), if it said so validly.
    #[inline]
    pub fn caller_timeout(&self) -> Option<Duration> {
        self.caller_timeout
    }

    /// When the request must be answered: the server's timeout from when it
    /// was received, or sooner when the caller said so; `None` until the
    /// timeout step ran (or without one).
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Sets the deadline (the timeout step).
    #[inline]
    pub(crate) fn set_deadline(&mut self, at: Instant) {
        self.deadline = Some(at);
    }

    /// The authenticated caller, once the guard verified a token.
    pub fn principal(&self) -> Option<Principal> {
        self.note.as_ref()?.authorized().map(|(p, _)| p)
    }

    /// The decision note, opened here if no step opened it yet.
    #[inline]
    pub(crate) fn note(&mut self) -> &AuditNote {
        self.note.get_or_insert_with(AuditNote::default)
    }
}

impl fmt::Debug for RequestContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestContext")
            .field("id", &self.id)
            .field("trace", &self.trace)
            .finish_non_exhaustive()
    }
}

/// Extracts the request's context; outside the chassis stack, a fresh one.
impl<S: Send + Sync> FromRequestParts<S> for RequestContext {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<Self>()
            .cloned()
            .unwrap_or_else(|| Self::from_headers(&parts.headers)))
    }
}

/// The caller's remaining time from the value of its one `x-timeout-ms`.
fn caller_timeout_of(value: Option<&http::HeaderValue>) -> Option<Duration> {
    let bytes = value?.as_bytes();
    if bytes.is_empty() || bytes.len() > 12 || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(bytes)
        .ok()?
        .parse::<u64>()
        .ok()
        .map(Duration::from_millis)
}
