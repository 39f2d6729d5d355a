//! Error responses: RFC 9457 `application/problem+json`, everywhere.
//!
//! # The standard
//!
//! Every error a service returns, whether it comes from the chassis (404, 405,
//! 413, a timeout, load shedding, a panic) or from a handler, is an
//! `application/problem+json` document with `type`, `title`, `status`,
//! `detail` and the request's `correlation_id`. A client therefore parses one
//! error format, and an operator can find the logs of any failed call from the
//! body alone. Nothing internal ever reaches `detail`: no stack traces, SQL,
//! key material or panic messages.
//!
//! # How the chassis does it
//!
//! * [`Problem`] is the error type handlers return (it implements
//!   [`IntoResponse`]).
//! * [`EnsureProblemLayer`] sits just inside the correlation layer and makes
//!   sure every error response leaving the service is a problem document that
//!   carries the correlation id:
//!   - a [`Problem`] rendered without an id is rendered again with it;
//!   - any other 4xx whose body is not JSON (axum's extractor rejections,
//!     the router's bare 405, a handler's `(StatusCode, String)`) is
//!     replaced by a problem document with the same status and headers
//!     (`Allow`, `Retry-After`, `WWW-Authenticate` are kept), its text
//!     becoming `detail` (when short), because extractor rejections are
//!     written for the client; a 4xx JSON body is the handler's own and
//!     passes;
//!   - **no 5xx body from a handler ever reaches the client**, whatever its
//!     media type, because a 5xx body is where internal details leak
//!     (`{"error":"no such table: users ..."}`, a driver error, a URL with a
//!     password). The client gets the generic problem of that status, with
//!     the correlation id, the same status and the same headers (a 503 keeps
//!     its `Retry-After`). The original body goes to the log instead: one
//!     `ERROR` event of target [`LOG_TARGET`] with the request's
//!     `correlation_id`, the `status`, the `content_type`, the `body` (its
//!     first 2 KiB, as text) and whether it was `truncated`. An empty body
//!     is not logged (the access log has the status), and a streamed one is
//!     not waited for (logged without its text).
//!
//! A handler's own 5xx [`Problem`] is replaced entirely too, `type`,
//! `title`, `detail` and members alike (they go to the log): a handler can
//! put anything in them, and a client can do nothing with the details of a
//! server failure anyway, so the generic document loses it nothing. Only
//! the problems the chassis writes itself keep their content on a 5xx, as
//! does the readiness report: a shed request's 503, a timeout's 504, a
//! caught panic's 500, `jwks_unavailable`'s 503 with its `reason`.
//! Changing such a problem (its `detail`, a member) makes it a handler's
//! again. Only error responses pay for any of this: a response below 400
//! is handed on untouched.
//!
//! # Example
//!
//! ```
//! use axum::{Router, routing::get, body::Body};
//! use chassis::{correlation::SetCorrelationIdLayer, problem::{EnsureProblemLayer, Problem}};
//! use http::{Request, StatusCode};
//! use http_body_util::BodyExt;
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! async fn handler() -> Result<&'static str, Problem> {
//!     Err(Problem::new(StatusCode::CONFLICT).with_detail("the ticket is already reserved"))
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let app = Router::new().route("/", get(handler)).layer(
//!     ServiceBuilder::new()
//!         .layer(SetCorrelationIdLayer::new())
//!         .layer(EnsureProblemLayer::new()),
//! );
//! let res = app
//!     .oneshot(Request::get("/").header("x-correlation-id", "abc-123").body(Body::empty()).unwrap())
//!     .await
//!     .unwrap();
//! assert_eq!(res.status(), StatusCode::CONFLICT);
//! assert_eq!(res.headers()["content-type"], "application/problem+json");
//! let body: serde_json::Value =
//!     serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
//! assert_eq!(body["correlation_id"], "abc-123");
//! assert_eq!(body["detail"], "the ticket is already reserved");
//! # }
//! ```
//!
//! With the chassis' JSON log, the line of a withheld body carries the
//! request's `correlation_id` as a field of its own (the problem layer is
//! outside the request's span), so a client quoting the id of its generic
//! 500 leads an operator to the original error.
//!
//! # Ordering
//!
//! [`EnsureProblemLayer`] must be inside [`SetCorrelationIdLayer`] (it reads
//! the [`CorrelationId`] from the request) and outside every layer that can
//! produce an error response.
//!
//! [`SetCorrelationIdLayer`]: crate::correlation::SetCorrelationIdLayer

use std::{
    borrow::Cow,
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
};

use axum::{
    body::Body,
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode, header};
use http_body::Body as _;
use pin_project_lite::pin_project;
use serde::Serialize;
use tower::{Layer, Service};

use crate::context::{CorrelationId, RequestContext};

/// The media type of a problem document (RFC 9457 §3).
pub const CONTENT_TYPE: &str = "application/problem+json";

/// The largest non-JSON error body whose text is kept as `detail` of a 4xx.
const MAX_KEPT_DETAIL: usize = 512;

/// The most of a withheld 5xx body that is logged.
const MAX_LOGGED_BODY: usize = 2048;

/// Target of the log events of withheld 5xx bodies.
pub const LOG_TARGET: &str = "chassis::problem";

/// An RFC 9457 problem document, the body of every error response.
///
/// The `type` of a chassis problem is a URN, `urn:chassis:problem:<slug>`,
/// where the slug names the kind of error (`not-found`, `timeout`, ...); a
/// service may use its own URIs with [`Problem::with_type`]. Extra members
/// (such as the `reason` code of an authentication failure) are added with
/// [`Problem::with_member`].
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    #[serde(rename = "type")]
    kind: Cow<'static, str>,
    title: Cow<'static, str>,
    #[serde(serialize_with = "serialize_status")]
    status: StatusCode,
    detail: Cow<'static, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    correlation_id: Option<CorrelationId>,
    #[serde(flatten)]
    members: serde_json::Map<String, serde_json::Value>,
    #[serde(skip)]
    headers: Vec<(header::HeaderName, HeaderValue)>,
    /// Whether the chassis wrote this problem's content itself, see
    /// [`Vetted`].
    #[serde(skip)]
    vetted: bool,
}

fn serialize_status<S: serde::Serializer>(status: &StatusCode, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u16(status.as_u16())
}

/// Marks a response whose body is a [`Problem`], so [`EnsureProblem`] can
/// render it again with the correlation id when it was built without one.
#[derive(Debug, Clone)]
struct RenderedProblem(Problem);

/// Marks a response whose body the chassis wrote itself and vouches for
/// (its own problems, the readiness report): a 5xx so marked reaches the
/// client as it is, any other 5xx body is withheld. Crate-private, so a
/// handler cannot set it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Vetted;

// === impl Problem ===

impl Problem {
    /// A problem for `status`, with the standard title and type of that status
    /// and a generic `detail`.
    pub fn new(status: StatusCode) -> Self {
        let (slug, detail) = describe(status);
        Self {
            kind: Cow::Owned(format!("urn:chassis:problem:{slug}")),
            title: Cow::Borrowed(status.canonical_reason().unwrap_or("Error")),
            status,
            detail: Cow::Borrowed(detail),
            correlation_id: None,
            members: serde_json::Map::new(),
            headers: Vec::new(),
            vetted: false,
        }
    }

    /// Marks a problem whose content the chassis wrote, so that a 5xx keeps
    /// it (see the [module docs](self)). Setting `type`, `title`, `detail`
    /// or a member afterwards clears the mark.
    pub(crate) fn vetted(mut self) -> Self {
        self.vetted = true;
        self
    }

    /// 404: no route matches the request path.
    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND)
    }

    /// 500: a bug or an unexpected failure; the detail never says which.
    pub fn internal() -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// 503 with `Retry-After: <secs>`: the service cannot take the request now.
    pub fn unavailable(retry_after_secs: u32) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE)
            .with_header(header::RETRY_AFTER, HeaderValue::from(retry_after_secs))
    }

    /// Sets the `type` URI.
    #[must_use]
    pub fn with_type(mut self, kind: impl Into<Cow<'static, str>>) -> Self {
        self.kind = kind.into();
        self.vetted = false;
        self
    }

    /// Sets the `title`, a short summary of the kind of problem.
    #[must_use]
    pub fn with_title(mut self, title: impl Into<Cow<'static, str>>) -> Self {
        self.title = title.into();
        self.vetted = false;
        self
    }

    /// Sets the `detail`, an explanation of this occurrence for the client.
    /// Never put internal details (errors of dependencies, SQL, keys) here.
    #[must_use]
    pub fn with_detail(mut self, detail: impl Into<Cow<'static, str>>) -> Self {
        self.detail = detail.into();
        self.vetted = false;
        self
    }

    /// Sets the correlation id; [`EnsureProblemLayer`] does it for you.
    #[must_use]
    pub fn with_correlation_id(mut self, id: CorrelationId) -> Self {
        self.correlation_id = Some(id);
        self
    }

    /// Adds an extension member, e.g. `reason` or `permission`.
    ///
    /// # Panics
    ///
    /// If `name` is one of the standard members, which have their own setters.
    #[must_use]
    #[track_caller]
    pub fn with_member(mut self, name: &str, value: impl Into<serde_json::Value>) -> Self {
        assert!(
            !matches!(
                name,
                "type" | "title" | "status" | "detail" | "correlation_id"
            ),
            "`{name}` is a standard problem member; use its own setter"
        );
        self.members.insert(name.to_owned(), value.into());
        self.vetted = false;
        self
    }

    /// Adds a header to the response, e.g. `Retry-After`.
    #[must_use]
    pub fn with_header(mut self, name: header::HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The `type` URI.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The `detail` text.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// An extension member, if set.
    pub fn member(&self, name: &str) -> Option<&serde_json::Value> {
        self.members.get(name)
    }

    fn render(&self) -> Response {
        // Serializing a map of strings and numbers cannot fail.
        let body = serde_json::to_vec(self).unwrap_or_default();
        let length = HeaderValue::from(body.len());
        let mut res = Response::new(Body::from(body));
        *res.status_mut() = self.status;
        let headers = res.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
        headers.insert(header::CONTENT_LENGTH, length);
        for (name, value) in &self.headers {
            headers.append(name.clone(), value.clone());
        }
        res
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut res = self.render();
        if self.vetted {
            res.extensions_mut().insert(Vetted);
        }
        if self.correlation_id.is_none() {
            res.extensions_mut().insert(RenderedProblem(self));
        }
        res
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.title,
            self.detail
        )
    }
}

impl std::error::Error for Problem {}

/// The slug and default detail of a status.
fn describe(status: StatusCode) -> (&'static str, &'static str) {
    match status.as_u16() {
        400 => ("bad-request", "The request is not valid."),
        401 => ("unauthorized", "The request is not authenticated."),
        403 => ("forbidden", "The caller may not perform this operation."),
        404 => ("not-found", "No resource matches the request path."),
        405 => (
            "method-not-allowed",
            "The resource does not support this method.",
        ),
        406 => (
            "not-acceptable",
            "No acceptable representation is available.",
        ),
        408 => ("request-timeout", "The request took too long to arrive."),
        409 => ("conflict", "The request conflicts with the current state."),
        410 => ("gone", "The resource is gone."),
        411 => ("length-required", "The request needs a Content-Length."),
        412 => (
            "precondition-failed",
            "A precondition of the request failed.",
        ),
        413 => (
            "payload-too-large",
            "The request body is larger than the service accepts.",
        ),
        414 => ("uri-too-long", "The request URI is too long."),
        415 => (
            "unsupported-media-type",
            "The request body has an unsupported media type.",
        ),
        422 => ("unprocessable-content", "The request body is not valid."),
        428 => ("precondition-required", "The request must be conditional."),
        429 => ("too-many-requests", "Too many requests; retry later."),
        431 => (
            "request-header-fields-too-large",
            "The request headers are too large.",
        ),
        500 => ("internal", "The service failed to handle the request."),
        501 => ("not-implemented", "The service does not implement this."),
        502 => ("bad-gateway", "A downstream service failed."),
        503 => (
            "unavailable",
            "The service cannot handle the request now; retry later.",
        ),
        504 => ("timeout", "The request did not complete in time."),
        s if s >= 500 => ("server-error", "The service failed to handle the request."),
        _ => ("client-error", "The request cannot be handled."),
    }
}

/// Layer that turns every error response into a problem document carrying the
/// correlation id; see the [module docs](self).
#[derive(Debug, Clone, Copy, Default)]
pub struct EnsureProblemLayer {
    _priv: (),
}

impl EnsureProblemLayer {
    /// Creates the layer.
    pub const fn new() -> Self {
        Self { _priv: () }
    }
}

impl<S> Layer<S> for EnsureProblemLayer {
    type Service = EnsureProblem<S>;

    fn layer(&self, inner: S) -> Self::Service {
        EnsureProblem { inner }
    }
}

/// Service built by [`EnsureProblemLayer`].
#[derive(Debug, Clone)]
pub struct EnsureProblem<S> {
    inner: S,
}

impl<S> EnsureProblem<S> {
    define_inner_service_accessors!();
}

impl<S, B> Service<Request<B>> for EnsureProblem<S>
where
    S: Service<Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let id = RequestContext::with(&mut req, |ctx| ctx.id().clone());
        ResponseFuture::new(self.inner.call(req), Some(id))
    }
}

impl<F> ResponseFuture<F> {
    /// Normalizes the errors of `inner`, naming `id` in their bodies.
    #[inline]
    pub(crate) fn new(inner: F, id: Option<CorrelationId>) -> Self {
        Self {
            inner,
            id,
            state: State::Inner,
            id_header: false,
        }
    }

    /// As [`new`](Self::new), and puts `id` on the response as
    /// `x-correlation-id`, as
    /// [`SetCorrelationId`](crate::correlation::SetCorrelationId) does: one
    /// future for both layers.
    #[inline]
    pub(crate) fn with_id_header(inner: F, id: CorrelationId) -> Self {
        Self {
            inner,
            id: Some(id),
            state: State::Inner,
            id_header: true,
        }
    }
}

pin_project! {
    /// Response future of [`EnsureProblem`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        id: Option<CorrelationId>,
        state: State,
        id_header: bool,
    }
}

enum State {
    Inner,
    /// Reading an error body: a short non-JSON 4xx to keep it as `detail`,
    /// or the start of a 5xx to log it; boxed, as it is rare and the future
    /// of every request would otherwise carry its size.
    Collecting(Box<Collecting>),
}

struct Collecting {
    parts: http::response::Parts,
    body: Body,
    buf: Vec<u8>,
    /// Whether bytes beyond [`Collecting::limit`] were left unread.
    truncated: bool,
}

impl Collecting {
    /// A 5xx body is read for the log, a 4xx one for `detail`.
    fn for_log(&self) -> bool {
        self.parts.status.is_server_error()
    }

    fn limit(&self) -> usize {
        if self.for_log() {
            MAX_LOGGED_BODY
        } else {
            MAX_KEPT_DETAIL
        }
    }

    /// Takes one frame; `true` once there is nothing more to read.
    fn take(&mut self, frame: Option<Result<http_body::Frame<Bytes>, axum::Error>>) -> bool {
        match frame {
            Some(Ok(frame)) => {
                let Some(data) = frame.data_ref() else {
                    return false;
                };
                let room = self.limit() - self.buf.len();
                if data.len() > room {
                    self.buf.extend_from_slice(&data[..room]);
                    self.truncated = true;
                    return true;
                }
                self.buf.extend_from_slice(data);
                false
            }
            Some(Err(_)) => {
                self.truncated = true;
                true
            }
            None => true,
        }
    }

    /// The answer once the body is read.
    fn finish(self, id: Option<CorrelationId>) -> Response {
        let Self {
            parts,
            buf,
            truncated,
            ..
        } = self;
        if parts.status.is_server_error() {
            let content_type = parts.headers.get(header::CONTENT_TYPE);
            log_withheld(
                parts.status,
                id.as_ref(),
                content_type,
                &String::from_utf8_lossy(&buf),
                truncated,
            );
            return replace(parts, None, id);
        }
        let detail = (!truncated)
            .then(|| String::from_utf8(buf).ok())
            .flatten()
            .filter(|s| !s.trim().is_empty());
        replace(parts, detail, id)
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut res = ready!(self.as_mut().poll_problem(cx))?;
        let this = self.project();
        if *this.id_header
            && let Some(id) = this.id.take()
        {
            res.headers_mut()
                .insert(crate::context::X_CORRELATION_ID, id.into_header_value());
        }
        Poll::Ready(Ok(res))
    }
}

impl<F, E> ResponseFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    fn poll_problem(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Response, E>> {
        let mut this = self.project();
        loop {
            match this.state {
                State::Inner => {
                    let res = ready!(this.inner.as_mut().poll(cx))?;
                    if res.status().as_u16() < 400 {
                        return Poll::Ready(Ok(res));
                    }
                    if res.status().is_server_error() && res.extensions().get::<Vetted>().is_none()
                    {
                        match withhold(res, this.id.as_ref()) {
                            Ok(res) => return Poll::Ready(Ok(res)),
                            Err(collecting) => {
                                *this.state = State::Collecting(collecting);
                                continue;
                            }
                        }
                    }
                    match classify(&res) {
                        Kind::Problem => {
                            return Poll::Ready(Ok(with_correlation(res, this.id.as_ref())));
                        }
                        Kind::Json => return Poll::Ready(Ok(res)),
                        Kind::Other => {
                            let (parts, body) = res.into_parts();
                            let short = body
                                .size_hint()
                                .upper()
                                .is_some_and(|n| n <= MAX_KEPT_DETAIL as u64);
                            if parts.status.is_client_error() && short {
                                *this.state = State::Collecting(Box::new(Collecting {
                                    parts,
                                    body,
                                    buf: Vec::new(),
                                    truncated: false,
                                }));
                                continue;
                            }
                            return Poll::Ready(Ok(replace(parts, None, this.id.clone())));
                        }
                    }
                }
                State::Collecting(collecting) => {
                    let frame = ready!(Pin::new(&mut collecting.body).poll_frame(cx));
                    if collecting.take(frame) {
                        let State::Collecting(collecting) =
                            std::mem::replace(this.state, State::Inner)
                        else {
                            unreachable!("matched above")
                        };
                        return Poll::Ready(Ok(collecting.finish(this.id.clone())));
                    }
                }
            }
        }
    }
}

/// A 5xx the chassis did not write: its body never reaches the client. A
/// [`Problem`] or an empty or streamed body is answered at once (the
/// problem logged); a body of bounded length is read first, up to
/// [`MAX_LOGGED_BODY`] bytes, for the log.
#[cold]
fn withhold(mut res: Response, id: Option<&CorrelationId>) -> Result<Response, Box<Collecting>> {
    if let Some(RenderedProblem(problem)) = res.extensions_mut().remove::<RenderedProblem>() {
        let text = serde_json::to_string(&problem).unwrap_or_default();
        let (text, truncated) = cut(&text, MAX_LOGGED_BODY);
        log_withheld(
            res.status(),
            id,
            res.headers().get(header::CONTENT_TYPE),
            text,
            truncated,
        );
        let (parts, _) = res.into_parts();
        return Ok(replace(parts, None, id.cloned()));
    }
    let (parts, body) = res.into_parts();
    let hint = body.size_hint();
    if body.is_end_stream() || hint.upper() == Some(0) {
        // Nothing to keep: the access log has the status.
        return Ok(replace(parts, None, id.cloned()));
    }
    if hint.upper().is_none() {
        // A streamed body might never end; it is not waited for.
        log_withheld(
            parts.status,
            id,
            parts.headers.get(header::CONTENT_TYPE),
            "",
            true,
        );
        return Ok(replace(parts, None, id.cloned()));
    }
    Err(Box::new(Collecting {
        parts,
        body,
        buf: Vec::new(),
        truncated: false,
    }))
}

/// `s` cut to at most `max` bytes on a character boundary, and whether it
/// was cut.
fn cut(s: &str, max: usize) -> (&str, bool) {
    if s.len() <= max {
        return (s, false);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    (&s[..end], true)
}

/// Logs the body of a 5xx withheld from the client, with the request's
/// correlation id.
#[cold]
fn log_withheld(
    status: StatusCode,
    id: Option<&CorrelationId>,
    content_type: Option<&HeaderValue>,
    body: &str,
    truncated: bool,
) {
    tracing::error!(
        target: LOG_TARGET,
        correlation_id = id.map(CorrelationId::as_str),
        status = status.as_u16(),
        content_type = content_type.and_then(|v| v.to_str().ok()),
        body,
        truncated,
        "server error body withheld from the client"
    );
}

enum Kind {
    Problem,
    Json,
    Other,
}

fn classify(res: &Response) -> Kind {
    if res.extensions().get::<RenderedProblem>().is_some() {
        return Kind::Problem;
    }
    match res
        .headers()
        .get(header::CONTENT_TYPE)
        .map(HeaderValue::as_bytes)
    {
        Some(ct) if ct.starts_with(CONTENT_TYPE.as_bytes()) => Kind::Json,
        Some(ct) if ct.starts_with(b"application/json") => Kind::Json,
        _ => Kind::Other,
    }
}

/// Renders a [`Problem`] again, now with the correlation id.
fn with_correlation(mut res: Response, id: Option<&CorrelationId>) -> Response {
    let (Some(problem), Some(id)) = (res.extensions_mut().remove::<RenderedProblem>(), id) else {
        return res;
    };
    let fresh = problem.0.with_correlation_id(id.clone()).render();
    let (mut parts, _) = res.into_parts();
    let (new_parts, body) = fresh.into_parts();
    // The problem's own headers again (content type and length of the new
    // body among them), and every header a layer added on the way out
    // (CORS, `Vary`, ...) kept.
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.extend(new_parts.headers);
    Response::from_parts(parts, body)
}

/// Replaces an error response with a problem of the same status, keeping
/// its headers (`Allow`, `Retry-After`, `WWW-Authenticate`, ...).
fn replace(
    mut parts: http::response::Parts,
    detail: Option<String>,
    id: Option<CorrelationId>,
) -> Response {
    let mut problem = Problem::new(parts.status);
    if let Some(detail) = detail {
        problem = problem.with_detail(detail);
    }
    if let Some(id) = id {
        problem = problem.with_correlation_id(id);
    }
    let (mut fresh, body) = problem.render().into_parts();
    // The new body's type and length, as a rendered problem has them.
    for name in [header::CONTENT_TYPE, header::CONTENT_LENGTH] {
        if let Some(value) = fresh.headers.remove(&name) {
            parts.headers.insert(name, value);
        }
    }
    Response::from_parts(parts, body)
}

/// Turns any response body into [`Bytes`]; used by tests and examples.
#[doc(hidden)]
pub async fn body_bytes(body: Body) -> Bytes {
    use http_body_util::BodyExt;
    body.collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::correlation::SetCorrelationIdLayer;
    use axum::{Router, routing::get};
    use tower::{ServiceBuilder, ServiceExt};

    fn app(router: Router) -> Router {
        router.layer(
            ServiceBuilder::new()
                .layer(SetCorrelationIdLayer::new())
                .layer(EnsureProblemLayer::new()),
        )
    }

    async fn send(app: Router, req: Request<Body>) -> (Response, serde_json::Value) {
        let res = app.oneshot(req).await.unwrap();
        let (parts, body) = res.into_parts();
        let bytes = body_bytes(body).await;
        let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        (Response::from_parts(parts, Body::empty()), json)
    }

    fn get_req(uri: &str) -> Request<Body> {
        Request::get(uri)
            .header("x-correlation-id", "req-1")
            .body(Body::empty())
            .unwrap()
    }

    #[tokio::test]
    async fn success_passes_untouched() {
        let app = app(Router::new().route("/", get(|| async { "hi" })));
        let res = app.oneshot(get_req("/")).await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(body_bytes(res.into_body()).await, "hi");
    }

    #[tokio::test]
    async fn problem_gets_correlation_id() {
        let app = app(Router::new().route(
            "/",
            get(|| async { Problem::new(StatusCode::CONFLICT).with_member("reason", "taken") }),
        ));
        let (res, body) = send(app, get_req("/")).await;
        assert_eq!(res.status(), StatusCode::CONFLICT);
        assert_eq!(res.headers()[header::CONTENT_TYPE], CONTENT_TYPE);
        assert_eq!(body["correlation_id"], "req-1");
        assert_eq!(body["status"], 409);
        assert_eq!(body["reason"], "taken");
        assert_eq!(body["type"], "urn:chassis:problem:conflict");
    }

    #[tokio::test]
    async fn rewritten_problems_carry_their_length() {
        // The layer outside the router, so no axum route sets the length.
        let router = Router::new()
            .route(
                "/conflict",
                get(|| async { Problem::new(StatusCode::CONFLICT) }),
            )
            .route("/text", get(|| async { (StatusCode::BAD_REQUEST, "no") }));
        let app = ServiceBuilder::new()
            .layer(SetCorrelationIdLayer::new())
            .layer(EnsureProblemLayer::new())
            .service(router);
        // Re-rendered with the id, rewritten from text, rewritten from
        // axum's bare 404.
        for uri in ["/conflict", "/text", "/nowhere"] {
            let res = app.clone().oneshot(get_req(uri)).await.unwrap();
            let length = res.headers()[header::CONTENT_LENGTH].clone();
            let body = body_bytes(res.into_body()).await;
            assert_eq!(length, body.len().to_string(), "{uri}");
        }
    }

    #[tokio::test]
    async fn client_error_text_becomes_detail() {
        let app = app(Router::new().route(
            "/",
            get(|| async { (StatusCode::BAD_REQUEST, "missing field `name`") }),
        ));
        let (res, body) = send(app, get_req("/")).await;
        assert_eq!(res.status(), 400);
        assert_eq!(res.headers()[header::CONTENT_TYPE], CONTENT_TYPE);
        assert_eq!(body["detail"], "missing field `name`");
        assert_eq!(body["correlation_id"], "req-1");
    }

    #[tokio::test]
    async fn server_error_text_never_leaks() {
        let app = app(Router::new().route(
            "/",
            get(|| async {
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "SELECT * FROM users failed: password=hunter2",
                )
            }),
        ));
        let (res, body) = send(app, get_req("/")).await;
        assert_eq!(res.status(), 500);
        let text = body.to_string();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(!text.contains("SELECT"), "{text}");
        assert_eq!(body["title"], "Internal Server Error");
    }

    #[tokio::test]
    async fn server_error_bodies_of_any_kind_are_withheld() {
        let app = app(Router::new()
            .route(
                "/json",
                get(|| async {
                    (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        axum::Json(
                            serde_json::json!({"error": "no such table: users (password=hunter2)"}),
                        ),
                    )
                }),
            )
            .route(
                "/problem",
                get(|| async {
                    Problem::unavailable(7)
                        .with_detail("pool exhausted at postgres://app:hunter2@db")
                        .with_member("reason", "hunter2")
                }),
            )
            .route(
                "/stream",
                get(|| async {
                    let chunks = futures_core_stream("hunter2");
                    (StatusCode::BAD_GATEWAY, Body::from_stream(chunks))
                }),
            )
            .route(
                "/empty",
                get(|| async { StatusCode::INTERNAL_SERVER_ERROR }),
            ));
        for (path, status) in [
            ("/json", 500),
            ("/problem", 503),
            ("/stream", 502),
            ("/empty", 500),
        ] {
            let (res, body) = send(app.clone(), get_req(path)).await;
            assert_eq!(res.status(), status, "{path}");
            assert_eq!(res.headers()[header::CONTENT_TYPE], CONTENT_TYPE, "{path}");
            assert!(!body.to_string().contains("hunter2"), "{path}: {body}");
            assert_eq!(
                body["detail"],
                Problem::new(res.status()).detail(),
                "{path}"
            );
            assert_eq!(body["correlation_id"], "req-1", "{path}");
            assert!(body.get("reason").is_none(), "{path}: {body}");
            if status == 503 {
                assert_eq!(res.headers()[header::RETRY_AFTER], "7");
            }
        }
    }

    #[tokio::test]
    async fn the_chassis_own_server_errors_keep_their_content() {
        let app = app(Router::new()
            .route(
                "/own",
                get(|| async { Problem::unavailable(3).with_detail("At capacity.").vetted() }),
            )
            .route(
                "/changed",
                get(|| async {
                    Problem::unavailable(3)
                        .vetted()
                        .with_detail("changed after: hunter2")
                }),
            ));
        let (res, body) = send(app.clone(), get_req("/own")).await;
        assert_eq!(res.status(), 503);
        assert_eq!(body["detail"], "At capacity.");
        assert_eq!(body["correlation_id"], "req-1");
        let (_, body) = send(app, get_req("/changed")).await;
        assert!(!body.to_string().contains("hunter2"), "{body}");
    }

    /// A body of unknown length, as a streamed response has.
    fn futures_core_stream(
        text: &'static str,
    ) -> impl futures_core::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
        struct Once(Option<Bytes>);
        impl futures_core::Stream for Once {
            type Item = Result<Bytes, std::io::Error>;
            fn poll_next(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Self::Item>> {
                Poll::Ready(self.0.take().map(Ok))
            }
        }
        Once(Some(Bytes::from_static(text.as_bytes())))
    }

    #[tokio::test]
    async fn method_not_allowed_keeps_allow_header() {
        let app = app(Router::new().route("/", get(|| async { "hi" })));
        let req = Request::post("/").body(Body::empty()).unwrap();
        let (res, body) = send(app, req).await;
        assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert!(res.headers().contains_key(header::ALLOW));
        assert_eq!(body["status"], 405);
        assert!(body["correlation_id"].is_string());
    }

    #[tokio::test]
    async fn json_error_bodies_are_left_alone() {
        let app = app(Router::new().route(
            "/",
            get(|| async {
                (
                    StatusCode::BAD_REQUEST,
                    axum::Json(serde_json::json!({"x": 1})),
                )
            }),
        ));
        let (_, body) = send(app, get_req("/")).await;
        assert_eq!(body, serde_json::json!({"x": 1}));
    }

    #[tokio::test]
    async fn long_client_error_text_is_not_kept() {
        let long = "x".repeat(MAX_KEPT_DETAIL + 1);
        let app = app(Router::new().route(
            "/",
            get(move || async move { (StatusCode::BAD_REQUEST, long) }),
        ));
        let (_, body) = send(app, get_req("/")).await;
        assert_eq!(body["detail"], "The request is not valid.");
    }

    #[test]
    #[should_panic(expected = "standard problem member")]
    fn standard_members_cannot_be_overwritten() {
        let _ = Problem::not_found().with_member("status", 200);
    }
}
