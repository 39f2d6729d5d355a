//! Correlation IDs and W3C trace context.
//!
//! # The standard
//!
//! Every request carries a correlation id from the edge of the system to the
//! last service it touches, so that one search finds every log line, audit
//! record, metric exemplar and outbox row of one user action. Every service
//! therefore:
//!
//! * accepts the caller's `x-correlation-id` when it is 1-128 characters of
//!   `[A-Za-z0-9._~:-]` and exactly one header carries it;
//! * otherwise replaces it with a fresh UUIDv7 (time-ordered, so ids sort
//!   roughly by time), and never echoes or logs the rejected value as it came
//!   (that is how header and log injection happen: a rejected value is logged
//!   only as a short, escaped sample, at debug level);
//! * returns the id on every response, puts it in the request's tracing span
//!   (so every log line of the request carries it) and in every error body;
//! * forwards it on every outgoing call.
//!
//! Trace context follows W3C Trace Context Level 1: a valid `traceparent`
//! (`00-<32 hex>-<16 hex>-<2 hex>`, lowercase, ids not all zero, version not
//! `ff`; later versions are read by their first four fields) is continued, so
//! its trace id appears in our logs and on our outgoing calls; an invalid one
//! is ignored together with its `tracestate`, and a new trace is started.
//! Neither header is ever a reason to reject a request. A request that
//! brings neither gets one UUIDv7 for both: the new trace's id is the
//! correlation id's 128 bits (the last 7 bytes random, as Trace Context
//! Level 2 asks of a random trace id), so a search by either finds the other.
//!
//! Client-supplied ids are hints for correlation, never identities: do not use
//! them as idempotency keys, cache keys or authorization inputs, and never as
//! metric labels.
//!
//! # How the chassis does it
//!
//! [`SetCorrelationIdLayer`] validates or generates the [`CorrelationId`],
//! parses the [`TraceContext`], puts both into the request extensions as one
//! [`Correlation`] (handlers extract either) and sets `x-correlation-id` on
//! the response. Code inside reads the id from there, never from the raw
//! request header, which may hold the rejected value. An
//! outgoing client forwards [`CorrelationId::header_value`] and
//! [`TraceContext::child_traceparent`] (plus [`TraceContext::tracestate`]).
//!
//! # Example
//!
//! ```
//! use axum::{Router, body::Body, routing::get};
//! use chassis::correlation::{CorrelationId, SetCorrelationIdLayer, TraceContext};
//! use http::Request;
//! use tower::ServiceExt;
//!
//! async fn handler(id: CorrelationId, trace: TraceContext) -> String {
//!     format!("{id} {}", trace.trace_id())
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let app = Router::new().route("/", get(handler)).layer(SetCorrelationIdLayer::new());
//! let req = Request::get("/")
//!     .header("x-correlation-id", "order-42")
//!     .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
//!     .body(Body::empty())
//!     .unwrap();
//! let res = app.clone().oneshot(req).await.unwrap();
//! assert_eq!(res.headers()["x-correlation-id"], "order-42");
//! let body = chassis::problem::body_bytes(res.into_body()).await;
//! assert_eq!(body, "order-42 4bf92f3577b34da6a3ce929d0e0e4736");
//!
//! // A value that could inject a header or a log line is replaced.
//! let req = Request::get("/").header("x-correlation-id", "a b").body(Body::empty()).unwrap();
//! let res = app.oneshot(req).await.unwrap();
//! assert_ne!(res.headers()["x-correlation-id"], "a b");
//! # }
//! ```
//!
//! # Ordering
//!
//! Outermost: everything inside (problem bodies, the request span, metrics,
//! audit) reads the id from the request extensions.

use std::{
    convert::Infallible,
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
};

use axum::{extract::FromRequestParts, response::Response};
use http::{HeaderMap, HeaderName, HeaderValue, Request, request::Parts};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

/// `x-correlation-id`, the header that carries the correlation id.
pub const X_CORRELATION_ID: HeaderName = HeaderName::from_static("x-correlation-id");
/// `traceparent` (W3C Trace Context).
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// `tracestate` (W3C Trace Context).
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The longest accepted correlation id.
pub const MAX_LEN: usize = 128;
/// At most this many `tracestate` list members are kept (W3C §3.3.1.1).
const MAX_TRACESTATE_MEMBERS: usize = 32;
/// At most this many characters of `tracestate` are kept.
const MAX_TRACESTATE_LEN: usize = 512;
/// Longer `tracestate` members are dropped first (W3C §3.3.1.5).
const MAX_TRACESTATE_MEMBER_LEN: usize = 128;
/// At most this many bytes of a rejected id are logged, escaped.
const REJECTED_SAMPLE_LEN: usize = 64;

/// The correlation id and trace context of a request: the one request
/// extension [`SetCorrelationIdLayer`] inserts. Handlers usually extract
/// [`CorrelationId`] or [`TraceContext`] directly.
#[derive(Clone)]
pub struct Correlation {
    id: CorrelationId,
    trace: TraceContext,
    /// When the request was received: one clock reading for the layers that
    /// measure it (latency, audit, timeout).
    received: tokio::time::Instant,
    /// The request's audit note, kept here by the audit layer rather than in
    /// an extension of its own (see [`crate::audit`]).
    pub(crate) note: Option<crate::audit::AuditNote>,
    /// The caller's `x-timeout-ms`, read with the ids (`None`: not read, as
    /// for a correlation made by hand).
    pub(crate) caller_timeout: Option<Option<std::time::Duration>>,
}

impl Correlation {
    /// A correlation for work that did not come from a request, such as a
    /// background job continuing what a request started (pass the id stored
    /// with the job) or a scheduled task (pass [`CorrelationId::generate`]).
    pub fn new(id: CorrelationId, trace: TraceContext) -> Self {
        Self {
            id,
            trace,
            received: tokio::time::Instant::now(),
            note: None,
            caller_timeout: None,
        }
    }

    /// When the request was received (or the correlation made).
    pub(crate) fn received(&self) -> tokio::time::Instant {
        self.received
    }

    /// The correlation id.
    pub fn id(&self) -> &CorrelationId {
        &self.id
    }

    /// The trace context.
    pub fn trace(&self) -> &TraceContext {
        &self.trace
    }
}

impl fmt::Debug for Correlation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Correlation")
            .field("id", &self.id)
            .field("trace", &self.trace)
            .finish_non_exhaustive()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Correlation {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<Self>()
            .cloned()
            .unwrap_or_else(|| Self::new(CorrelationId::generate(), TraceContext::new_root())))
    }
}

/// A validated correlation id: 1-128 characters of `[A-Za-z0-9._~:-]`.
///
/// Cloning is cheap (a reference count), and the value is exactly what goes
/// on the wire, so it is safe to put in headers and logs.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CorrelationId(HeaderValue);

// === impl CorrelationId ===

impl CorrelationId {
    /// Validates `value`; `None` if it is not 1-128 characters of
    /// `[A-Za-z0-9._~:-]`.
    pub fn parse(value: &str) -> Option<Self> {
        Self::from_header(&HeaderValue::from_str(value).ok()?)
    }

    /// Validates a header value without copying it.
    pub fn from_header(value: &HeaderValue) -> Option<Self> {
        let bytes = value.as_bytes();
        let valid = !bytes.is_empty()
            && bytes.len() <= MAX_LEN
            && bytes.iter().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b':' | b'-')
            });
        valid.then(|| Self(value.clone()))
    }

    /// A fresh UUIDv7, hyphenated and lowercase.
    pub fn generate() -> Self {
        Self::generate_uuid().0
    }

    /// A fresh UUIDv7 as an id, and its 128 bits.
    fn generate_uuid() -> (Self, [u8; 16]) {
        let uuid = crate::id::uuid_v7();
        let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        uuid.hyphenated().encode_lower(&mut buf);
        // Owned by the `Bytes` from the start: one allocation, and clones
        // only count references (a `Bytes` made from a `Vec` allocates again
        // on its first clone).
        let id = Self(
            HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(buf))
                .expect("a UUID is a valid header value"),
        );
        (id, uuid.into_bytes())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        // Validated or generated as ASCII, so this cannot fail. The UTF-8
        // check reads words at a time; `HeaderValue::to_str` would test
        // every byte again, on each of the several reads of a request.
        std::str::from_utf8(self.0.as_bytes()).unwrap_or_default()
    }

    /// The id as a header value, owned.
    pub(crate) fn into_header_value(self) -> HeaderValue {
        self.0
    }

    /// The id as a header value, to forward on an outgoing call.
    pub fn header_value(&self) -> &HeaderValue {
        &self.0
    }

    /// The id of a request, when exactly one valid `x-correlation-id` came.
    fn from_seen(seen: Seen<'_>) -> Result<Self, Rejected<'_>> {
        match seen {
            Seen::Absent => Err(Rejected::Missing),
            Seen::Once(v) => Self::from_header(v).ok_or(Rejected::Invalid(v)),
            Seen::Repeated(v) => Err(Rejected::Invalid(v)),
        }
    }
}

enum Rejected<'a> {
    Missing,
    Invalid(&'a HeaderValue),
}

impl fmt::Debug for CorrelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for CorrelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for CorrelationId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Extracts the request's id; outside the chassis stack, a fresh one.
impl<S: Send + Sync> FromRequestParts<S> for CorrelationId {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<Correlation>()
            .map_or_else(Self::generate, |c| c.id.clone()))
    }
}

/// The W3C trace context of a request: the trace it belongs to and the span
/// this service opened for it.
#[derive(Clone, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: [u8; 16],
    parent_id: Option<[u8; 8]>,
    span_id: [u8; 8],
    flags: u8,
    tracestate: Option<HeaderValue>,
}

// === impl TraceContext ===

impl TraceContext {
    /// Continues the trace of a valid `traceparent` in `headers`, or starts a
    /// new one. `tracestate` is kept only with a valid `traceparent`.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let mut values = headers.get_all(TRACEPARENT).iter();
        let seen = match (values.next(), values.next()) {
            (None, _) => Seen::Absent,
            (Some(v), None) => Seen::Once(v),
            (Some(v), Some(_)) => Seen::Repeated(v),
        };
        Self::from_seen(seen, headers, None)
    }

    /// As [`from_headers`](Self::from_headers), from the `traceparent`
    /// already found in `headers`; a new trace takes `root` as its id when
    /// given.
    fn from_seen(traceparent: Seen<'_>, headers: &HeaderMap, root: Option<[u8; 16]>) -> Self {
        let parsed = match traceparent {
            Seen::Once(v) => parse_traceparent(v.as_bytes()),
            Seen::Absent | Seen::Repeated(_) => None,
        };
        match parsed {
            Some((trace_id, parent_id, flags)) => Self {
                trace_id,
                parent_id: Some(parent_id),
                span_id: random_nonzero(),
                flags,
                tracestate: clean_tracestate(headers),
            },
            None => match root {
                Some(trace_id) => Self {
                    trace_id,
                    parent_id: None,
                    span_id: random_nonzero(),
                    flags: 0x01,
                    tracestate: None,
                },
                None => Self::new_root(),
            },
        }
    }

    /// A new trace, sampled.
    pub fn new_root() -> Self {
        Self {
            trace_id: random_nonzero(),
            parent_id: None,
            span_id: random_nonzero(),
            flags: 0x01,
            tracestate: None,
        }
    }

    /// The trace id, 32 lowercase hex digits.
    pub fn trace_id(&self) -> HexId<32> {
        HexId::new(&self.trace_id)
    }

    /// The id of this service's span for the request, 16 hex digits.
    pub fn span_id(&self) -> HexId<16> {
        HexId::new(&self.span_id)
    }

    /// The caller's span id, when the trace was continued.
    pub fn parent_id(&self) -> Option<HexId<16>> {
        self.parent_id.as_ref().map(|p| HexId::new(p))
    }

    /// Whether the caller asked for the trace to be sampled.
    pub fn sampled(&self) -> bool {
        self.flags & 0x01 == 0x01
    }

    /// A `traceparent` for an outgoing call: same trace, a new parent id.
    pub fn child_traceparent(&self) -> HeaderValue {
        let parent: [u8; 8] = random_nonzero();
        let text = format!(
            "00-{}-{}-{:02x}",
            self.trace_id(),
            HexId::<16>::new(&parent),
            self.flags
        );
        HeaderValue::from_str(&text).expect("hex digits are a valid header value")
    }

    /// The cleaned `tracestate` to forward, if the caller sent one.
    pub fn tracestate(&self) -> Option<&HeaderValue> {
        self.tracestate.as_ref()
    }
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceContext")
            .field("trace_id", &self.trace_id().as_str())
            .field("span_id", &self.span_id().as_str())
            .field("sampled", &self.sampled())
            .finish_non_exhaustive()
    }
}

/// Extracts the request's trace context; outside the chassis stack, a new
/// root.
impl<S: Send + Sync> FromRequestParts<S> for TraceContext {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<Correlation>()
            .map_or_else(Self::new_root, |c| c.trace.clone()))
    }
}

/// The two lowercase hex digits of every byte: one lookup per byte.
static HEX_PAIRS: [[u8; 2]; 256] = {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut table = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = [DIGITS[i >> 4], DIGITS[i & 0x0f]];
        i += 1;
    }
    table
};

/// An id printed as `N` lowercase hex digits, without allocating.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HexId<const N: usize>([u8; N]);

impl<const N: usize> HexId<N> {
    fn new(bytes: &[u8]) -> Self {
        let mut out = [b'0'; N];
        for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
            pair.copy_from_slice(&HEX_PAIRS[usize::from(*b)]);
        }
        Self(out)
    }

    /// The digits as text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// The digits, ASCII.
    pub(crate) fn as_bytes(&self) -> &[u8; N] {
        &self.0
    }
}

impl<const N: usize> fmt::Display for HexId<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<const N: usize> fmt::Debug for HexId<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn random_nonzero<const N: usize>() -> [u8; N] {
    loop {
        let mut out = [0u8; N];
        fastrand::fill(&mut out);
        if out.iter().any(|b| *b != 0) {
            return out;
        }
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

fn parse_hex<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in text.chunks_exact(2).enumerate() {
        out[i] = (hex_value(pair[0])? << 4) | hex_value(pair[1])?;
    }
    Some(out)
}

/// Parses a `traceparent` per W3C Trace Context Level 1 §3.2.
fn parse_traceparent(v: &[u8]) -> Option<([u8; 16], [u8; 8], u8)> {
    // version(2) - trace-id(32) - parent-id(16) - flags(2) = 55 bytes.
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let version: [u8; 1] = parse_hex(&v[0..2])?;
    match version[0] {
        0xff => return None,
        0x00 if v.len() != 55 => return None,
        // A later version may append fields, each after a '-'.
        _ if v.len() > 55 && v[55] != b'-' => return None,
        _ => {}
    }
    let trace_id: [u8; 16] = parse_hex(&v[3..35])?;
    let parent_id: [u8; 8] = parse_hex(&v[36..52])?;
    let flags: [u8; 1] = parse_hex(&v[53..55])?;
    if trace_id.iter().all(|b| *b == 0) || parent_id.iter().all(|b| *b == 0) {
        return None;
    }
    Some((trace_id, parent_id, flags[0]))
}

/// Joins the `tracestate` headers and keeps what may be forwarded: at most 32
/// well-formed members and 512 characters, dropping whole members, longest
/// ones (over 128 characters) first.
fn clean_tracestate(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut members: Vec<&str> = Vec::new();
    for value in headers.get_all(TRACESTATE) {
        let text = value.to_str().ok()?;
        for member in text.split(',') {
            let member = member.trim_matches([' ', '\t']);
            if member.is_empty() {
                continue;
            }
            let (key, val) = member.split_once('=')?;
            if key.is_empty()
                || val.is_empty()
                || members.iter().any(|m| m.split('=').next() == Some(key))
            {
                // A malformed list or a duplicate key: the spec says to discard it all.
                return None;
            }
            members.push(member);
        }
    }
    members.truncate(MAX_TRACESTATE_MEMBERS);
    let len = |ms: &[&str]| {
        ms.iter()
            .map(|m| m.len() + 1)
            .sum::<usize>()
            .saturating_sub(1)
    };
    if len(&members) > MAX_TRACESTATE_LEN {
        members.retain(|m| m.len() <= MAX_TRACESTATE_MEMBER_LEN);
    }
    while len(&members) > MAX_TRACESTATE_LEN {
        members.pop();
    }
    if members.is_empty() {
        return None;
    }
    HeaderValue::from_str(&members.join(",")).ok()
}

/// A short, escaped sample of a rejected id, safe for any log format.
fn sample(value: &HeaderValue) -> String {
    value
        .as_bytes()
        .iter()
        .take(REJECTED_SAMPLE_LEN)
        .flat_map(|b| std::ascii::escape_default(*b))
        .map(char::from)
        .collect()
}

/// Layer that validates or generates the [`CorrelationId`], parses the
/// [`TraceContext`] and returns the id on the response; see the
/// [module docs](self).
#[derive(Debug, Clone, Copy, Default)]
pub struct SetCorrelationIdLayer {
    _priv: (),
}

impl SetCorrelationIdLayer {
    /// Creates the layer.
    pub const fn new() -> Self {
        Self { _priv: () }
    }
}

impl<S> Layer<S> for SetCorrelationIdLayer {
    type Service = SetCorrelationId<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SetCorrelationId { inner }
    }
}

/// Service built by [`SetCorrelationIdLayer`].
#[derive(Debug, Clone)]
pub struct SetCorrelationId<S> {
    inner: S,
}

impl<S> SetCorrelationId<S> {
    define_inner_service_accessors!();

    /// Wraps `inner`.
    pub const fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S, B> Service<Request<B>> for SetCorrelationId<S>
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
        let id = assign(&mut req);
        ResponseFuture::new(self.inner.call(req), id)
    }
}

/// What [`SetCorrelationId`] does to a request: validates or creates its
/// id, reads its trace context, and puts both in its extensions. Returns
/// the id, for the response.
pub(crate) fn assign<B>(req: &mut Request<B>) -> CorrelationId {
    // A request that comes with neither id gets one UUIDv7 for both: its
    // 128 bits are the new trace's id (version and variant bits included,
    // the last 7 bytes random as W3C Trace Context asks), so a search by
    // either id finds the other, and one random draw serves both.
    let wanted = Wanted::scan(req.headers());
    let (id, root) = match CorrelationId::from_seen(wanted.correlation_id) {
        Ok(id) => (id, None),
        Err(rejected) => {
            let (id, uuid) = CorrelationId::generate_uuid();
            if let Rejected::Invalid(value) = rejected {
                tracing::debug!(
                    correlation_id_rejected = true,
                    sample = %sample(value),
                    replacement = %id,
                    "invalid x-correlation-id replaced"
                );
            }
            (id, Some(uuid))
        }
    };
    let trace = TraceContext::from_seen(wanted.traceparent, req.headers(), root);
    let mut correlation = Correlation::new(id.clone(), trace);
    correlation.caller_timeout = Some(crate::protect::caller_timeout_of(wanted.timeout_ms.once()));
    // Inner layers and handlers read the validated id from this
    // extension, never from the raw header.
    req.extensions_mut().insert(correlation);
    id
}

/// How often a request carries a header the front layers read.
#[derive(Clone, Copy)]
enum Seen<'a> {
    Absent,
    Once(&'a HeaderValue),
    /// More than once; the first value.
    Repeated(&'a HeaderValue),
}

impl<'a> Seen<'a> {
    fn add(&mut self, value: &'a HeaderValue) {
        *self = match *self {
            Seen::Absent => Seen::Once(value),
            Seen::Once(first) | Seen::Repeated(first) => Seen::Repeated(first),
        };
    }

    /// The value, when the header came exactly once.
    fn once(self) -> Option<&'a HeaderValue> {
        match self {
            Seen::Once(v) => Some(v),
            Seen::Absent | Seen::Repeated(_) => None,
        }
    }
}

/// The headers the front layers read: `x-correlation-id`, `traceparent` and
/// `x-timeout-ms`.
struct Wanted<'a> {
    correlation_id: Seen<'a>,
    traceparent: Seen<'a>,
    timeout_ms: Seen<'a>,
}

/// Up to this many header values, one pass comparing names finds the wanted
/// headers faster than hashing each wanted name for a lookup.
const SCAN_MAX_HEADERS: usize = 24;

impl<'a> Wanted<'a> {
    fn scan(headers: &'a HeaderMap) -> Self {
        if headers.len() > SCAN_MAX_HEADERS {
            let seen = |name: HeaderName| {
                let mut seen = Seen::Absent;
                for v in headers.get_all(name).iter().take(2) {
                    seen.add(v);
                }
                seen
            };
            return Self {
                correlation_id: seen(X_CORRELATION_ID),
                traceparent: seen(TRACEPARENT),
                timeout_ms: seen(crate::protect::X_TIMEOUT_MS),
            };
        }
        let mut wanted = Self {
            correlation_id: Seen::Absent,
            traceparent: Seen::Absent,
            timeout_ms: Seen::Absent,
        };
        for (name, value) in headers {
            if *name == X_CORRELATION_ID {
                wanted.correlation_id.add(value);
            } else if *name == TRACEPARENT {
                wanted.traceparent.add(value);
            } else if *name == crate::protect::X_TIMEOUT_MS {
                wanted.timeout_ms.add(value);
            }
        }
        wanted
    }
}

pin_project! {
    /// Response future of [`SetCorrelationId`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        id: Option<CorrelationId>,
    }
}

impl<F> ResponseFuture<F> {
    /// Puts `id` on the response of `inner`.
    pub(crate) fn new(inner: F, id: CorrelationId) -> Self {
        Self {
            inner,
            id: Some(id),
        }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut res = ready!(this.inner.poll(cx))?;
        if let Some(id) = this.id.take() {
            res.headers_mut().insert(X_CORRELATION_ID, id.0);
        }
        Poll::Ready(Ok(res))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::{Router, body::Body, routing::get};
    use tower::ServiceExt;

    fn app() -> Router {
        Router::new()
            .route(
                "/",
                get(|id: CorrelationId, t: TraceContext| async move {
                    format!(
                        "{id}|{}|{}",
                        t.trace_id(),
                        t.tracestate()
                            .map(|v| v.to_str().unwrap().to_owned())
                            .unwrap_or_default()
                    )
                }),
            )
            .layer(SetCorrelationIdLayer::new())
    }

    async fn call(req: Request<Body>) -> (HeaderValue, Vec<String>) {
        let res = app().oneshot(req).await.unwrap();
        let header = res.headers()[X_CORRELATION_ID].clone();
        assert_eq!(res.headers().get_all(X_CORRELATION_ID).iter().count(), 1);
        let body = crate::problem::body_bytes(res.into_body()).await;
        let parts = String::from_utf8(body.to_vec())
            .unwrap()
            .split('|')
            .map(str::to_owned)
            .collect();
        (header, parts)
    }

    fn with_id(value: &[u8]) -> Request<Body> {
        Request::get("/")
            .header(X_CORRELATION_ID, HeaderValue::from_bytes(value).unwrap())
            .body(Body::empty())
            .unwrap()
    }

    fn is_uuid_v7(v: &HeaderValue) -> bool {
        uuid::Uuid::parse_str(v.to_str().unwrap()).is_ok_and(|u| u.get_version_num() == 7)
    }

    // R1
    #[tokio::test]
    async fn missing_id_is_generated_as_uuid_v7() {
        let (header, body) = call(Request::get("/").body(Body::empty()).unwrap()).await;
        assert!(is_uuid_v7(&header), "{header:?}");
        assert_eq!(body[0], header.to_str().unwrap());
        // With no traceparent either, the new trace's id is the same UUID.
        assert_eq!(body[1], body[0].replace('-', ""));
    }

    #[tokio::test]
    async fn a_new_trace_has_its_own_id_when_the_caller_named_the_correlation() {
        let (a, b) = (
            call(with_id(b"order-1")).await.1,
            call(with_id(b"order-1")).await.1,
        );
        assert_eq!((a[0].as_str(), b[0].as_str()), ("order-1", "order-1"));
        assert_eq!(a[1].len(), 32);
        assert!(
            a[1].bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(a[1], b[1], "each request starts its own trace");
    }

    #[tokio::test]
    async fn a_continued_trace_keeps_the_callers_id_beside_a_generated_correlation_id() {
        let (header, body) = call(with_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            None,
        ))
        .await;
        assert!(is_uuid_v7(&header), "{header:?}");
        assert_eq!(body[1], "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[tokio::test]
    async fn ids_are_found_among_many_headers_as_among_few() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        for others in [0, 5, SCAN_MAX_HEADERS, SCAN_MAX_HEADERS + 10] {
            let with_others = |mut b: http::request::Builder| {
                for i in 0..others {
                    b = b.header(format!("x-other-{i}"), "v");
                }
                b
            };
            let req = with_others(Request::get("/"))
                .header(X_CORRELATION_ID, "kept-1")
                .header(TRACEPARENT, tp)
                .body(Body::empty())
                .unwrap();
            let (header, body) = call(req).await;
            assert_eq!(header, "kept-1", "{others} other headers");
            assert_eq!(body[1], "4bf92f3577b34da6a3ce929d0e0e4736");
            // Twice: replaced, and the trace is a new one.
            let req = with_others(Request::get("/"))
                .header(X_CORRELATION_ID, "kept-1")
                .header(X_CORRELATION_ID, "kept-2")
                .header(TRACEPARENT, tp)
                .header(TRACEPARENT, tp)
                .body(Body::empty())
                .unwrap();
            let (header, body) = call(req).await;
            assert!(is_uuid_v7(&header), "{others} other headers: {header:?}");
            assert_ne!(body[1], "4bf92f3577b34da6a3ce929d0e0e4736");
        }
    }

    #[test]
    fn hex_ids_are_lowercase_digits_of_every_byte() {
        let bytes: Vec<u8> = (0..=255).collect();
        for chunk in bytes.chunks(16) {
            let expected: String = chunk.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(HexId::<32>::new(chunk).as_str(), expected);
        }
    }

    // R2
    #[tokio::test]
    async fn valid_id_is_kept() {
        for id in ["abc-123", "a", "A.b_c~d:e-f", &"x".repeat(128)] {
            let (header, body) = call(with_id(id.as_bytes())).await;
            assert_eq!(header, id);
            assert_eq!(body[0], id);
        }
    }

    // R3, R5
    #[tokio::test]
    async fn invalid_ids_are_replaced() {
        let long = "x".repeat(129);
        let huge = "y".repeat(64 * 1024);
        let cases: Vec<&[u8]> = vec![
            b"abc Set-Cookie: x",
            b"abc\tdef",
            long.as_bytes(),
            huge.as_bytes(),
            b"caf\xc3\xa9",
            b"\xff\xfe",
            b"a,b",
            b"a/b",
            b"<script>",
            b"%0d%0a",
        ];
        for value in cases {
            let (header, body) = call(with_id(value)).await;
            assert!(is_uuid_v7(&header), "{value:?} gave {header:?}");
            assert_eq!(body[0], header.to_str().unwrap());
        }
    }

    #[test]
    fn header_values_with_line_breaks_cannot_be_built() {
        // The http crate refuses CR/LF/NUL, so no layer can be handed one.
        assert!(HeaderValue::from_bytes(b"abc\r\nSet-Cookie: x").is_err());
        assert!(HeaderValue::from_bytes(b"abc\0").is_err());
    }

    // R6
    #[tokio::test]
    async fn two_ids_are_replaced() {
        let req = Request::get("/")
            .header(X_CORRELATION_ID, "one")
            .header(X_CORRELATION_ID, "two")
            .body(Body::empty())
            .unwrap();
        let (header, _) = call(req).await;
        assert!(is_uuid_v7(&header));
    }

    #[tokio::test]
    async fn empty_id_is_replaced() {
        let (header, _) = call(with_id(b"")).await;
        assert!(is_uuid_v7(&header));
    }

    #[test]
    fn rejected_sample_is_escaped_and_short() {
        let v = HeaderValue::from_bytes(&[b'a'; 500]).unwrap();
        assert_eq!(sample(&v).len(), REJECTED_SAMPLE_LEN);
        let v = HeaderValue::from_bytes(b"\"}{\xff").unwrap();
        assert_eq!(sample(&v), "\\\"}{\\xff");
    }

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn with_traceparent(tp: &str, ts: Option<&str>) -> Request<Body> {
        let mut b = Request::get("/").header(TRACEPARENT, tp);
        if let Some(ts) = ts {
            b = b.header(TRACESTATE, ts);
        }
        b.body(Body::empty()).unwrap()
    }

    // R7
    #[tokio::test]
    async fn valid_traceparent_is_continued() {
        let (_, body) = call(with_traceparent(VALID, Some("congo=t61rcWkgMzE"))).await;
        assert_eq!(body[1], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(body[2], "congo=t61rcWkgMzE");
    }

    #[test]
    fn child_traceparent_keeps_trace_with_new_parent() {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(VALID));
        let ctx = TraceContext::from_headers(&h);
        let child = ctx.child_traceparent();
        let (trace, parent, flags) = parse_traceparent(child.as_bytes()).unwrap();
        assert_eq!(
            HexId::<32>::new(&trace).as_str(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_ne!(HexId::<16>::new(&parent).as_str(), "00f067aa0ba902b7");
        assert_eq!(flags, 1);
        assert_eq!(ctx.parent_id().unwrap().as_str(), "00f067aa0ba902b7");
    }

    // R8
    #[tokio::test]
    async fn invalid_traceparents_start_a_new_trace() {
        let cases = [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47366-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-001",
            "",
            "garbage",
        ];
        for tp in cases {
            let (_, body) = call(with_traceparent(tp, Some("congo=t61rcWkgMzE"))).await;
            assert_ne!(body[1], "4bf92f3577b34da6a3ce929d0e0e4736", "{tp}");
            assert_eq!(body[1].len(), 32);
            assert_ne!(body[1], "0".repeat(32));
            assert_eq!(
                body[2], "",
                "tracestate of an invalid traceparent must be dropped ({tp})"
            );
        }
    }

    #[tokio::test]
    async fn two_traceparents_start_a_new_trace() {
        let req = Request::get("/")
            .header(TRACEPARENT, VALID)
            .header(TRACEPARENT, VALID)
            .body(Body::empty())
            .unwrap();
        let (_, body) = call(req).await;
        assert_ne!(body[1], "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    // R9
    #[tokio::test]
    async fn future_version_is_read_by_its_first_fields() {
        let tp = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future";
        let (_, body) = call(with_traceparent(tp, None)).await;
        assert_eq!(body[1], "4bf92f3577b34da6a3ce929d0e0e4736");
        let tp = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (_, body) = call(with_traceparent(tp, None)).await;
        assert_eq!(body[1], "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    // R10
    #[tokio::test]
    async fn tracestate_is_bounded() {
        let many: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
        let (_, body) = call(with_traceparent(VALID, Some(&many.join(",")))).await;
        assert_eq!(body[2].split(',').count(), 32);
        assert!(body[2].starts_with("k0=v,k1=v"));

        let big: Vec<String> = (0..20)
            .map(|i| format!("k{i}={}", "v".repeat(200)))
            .collect();
        let (_, body) = call(with_traceparent(VALID, Some(&big.join(",")))).await;
        assert_eq!(body[2], "", "every member is over 128 chars");

        let mixed = format!("a=1,big={},b=2", "v".repeat(600));
        let (_, body) = call(with_traceparent(VALID, Some(&mixed))).await;
        assert_eq!(body[2], "a=1,b=2");

        let (_, body) = call(with_traceparent(VALID, Some("a=1,a=2"))).await;
        assert_eq!(body[2], "", "duplicate keys discard the list");
    }
}
