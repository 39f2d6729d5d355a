//! The ids of a request: [`CorrelationId`], [`TraceContext`] and [`HexId`],
//! and the reading of the headers that carry them.

use std::{
    convert::Infallible,
    fmt,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
};

use axum::extract::FromRequestParts;
use http::{HeaderMap, HeaderName, HeaderValue, request::Parts};

use super::RequestContext;

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
pub(crate) const REJECTED_SAMPLE_LEN: usize = 64;

/// The sampling of the traces this process starts: a trace is sampled when
/// the last 56 bits of its id, read as a number, are below this threshold
/// (`1 << 56` samples all, 0 none). Until a tracing pipeline sets it, none:
/// a process that records nothing does not ask the services after it to
/// record.
static ROOT_THRESHOLD: AtomicU64 = AtomicU64::new(0);
/// The span id of a context that names no span (all zeros, which W3C
/// Trace Context never sends).
const NO_SPAN: [u8; 8] = [0; 8];

/// Whether a continued trace keeps its caller's sampling decision.
static FOLLOW_PARENT: AtomicBool = AtomicBool::new(true);

/// Sets how this process samples: `root_ratio` (0 to 1) of the traces it
/// starts, and, when `follows_parent`, whatever the caller decided for the
/// traces it continues (else the same ratio, applied to the trace id).
///
/// The decision is read off the trace id's last 56 bits, the part W3C Trace
/// Context (level 2) requires to be random. (OpenTelemetry's Rust SDK reads
/// the last 63 bits, whose top bits are the fixed variant of the UUIDv7 a
/// new trace's id is made from here: it would sample such traces at 0 or
/// 100 % whatever the ratio.) Every process of a trace decides the same for
/// the same ratio.
#[cfg(feature = "otel")]
pub(crate) fn set_sampling(root_ratio: f64, follows_parent: bool) {
    ROOT_THRESHOLD.store(threshold(root_ratio), Ordering::Relaxed);
    FOLLOW_PARENT.store(follows_parent, Ordering::Relaxed);
}

/// The threshold on a trace id's last 56 bits below which `ratio` (0 to 1)
/// of the traces fall.
#[cfg(any(feature = "otel", test))]
fn threshold(ratio: f64) -> u64 {
    const ALL: u64 = 1 << 56;
    let ratio = if ratio.is_nan() {
        0.0
    } else {
        ratio.clamp(0.0, 1.0)
    };
    if ratio >= 1.0 {
        ALL
    } else {
        (ratio * ALL as f64) as u64
    }
}

/// Whether the trace `trace_id` falls below `threshold`.
fn below(trace_id: &[u8; 16], threshold: u64) -> bool {
    let mut low = [0u8; 8];
    low[1..].copy_from_slice(&trace_id[9..]);
    u64::from_be_bytes(low) < threshold
}

/// The trace flags of a new trace: sampled or not, by this process's ratio.
fn root_flags(trace_id: &[u8; 16]) -> u8 {
    u8::from(below(trace_id, ROOT_THRESHOLD.load(Ordering::Relaxed)))
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
    pub(super) fn generate_uuid() -> (Self, [u8; 16]) {
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
    pub(super) fn from_seen(seen: Seen<'_>) -> Result<Self, Rejected<'_>> {
        match seen {
            Seen::Absent => Err(Rejected::Missing),
            Seen::Once(v) => Self::from_header(v).ok_or(Rejected::Invalid(v)),
            Seen::Repeated(v) => Err(Rejected::Invalid(v)),
        }
    }
}

pub(super) enum Rejected<'a> {
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
            .get::<RequestContext>()
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
    pub(super) fn from_seen(
        traceparent: Seen<'_>,
        headers: &HeaderMap,
        root: Option<[u8; 16]>,
    ) -> Self {
        let parsed = match traceparent {
            Seen::Once(v) => parse_traceparent(v.as_bytes()),
            Seen::Absent | Seen::Repeated(_) => None,
        };
        match parsed {
            Some((trace_id, parent_id, flags)) => Self {
                trace_id,
                parent_id: Some(parent_id),
                span_id: random_nonzero(),
                flags: if FOLLOW_PARENT.load(Ordering::Relaxed) {
                    flags
                } else {
                    (flags & !0x01) | root_flags(&trace_id)
                },
                tracestate: clean_tracestate(headers),
            },
            None => match root {
                Some(trace_id) => Self {
                    trace_id,
                    parent_id: None,
                    span_id: random_nonzero(),
                    flags: root_flags(&trace_id),
                    tracestate: None,
                },
                None => Self::new_root(),
            },
        }
    }

    /// A new trace for work that records no span of its own, such as a
    /// scheduled job's calls: its [`child`](Self::child) spans are the
    /// trace's roots, so no recorded span names a parent that is never
    /// recorded.
    pub fn new_unrecorded_root() -> Self {
        Self {
            span_id: NO_SPAN,
            ..Self::new_root()
        }
    }

    /// A new trace, sampled as this process samples the traces it starts
    /// (none unless a tracing pipeline is configured; see
    /// [`crate::otel`]).
    pub fn new_root() -> Self {
        let trace_id = random_nonzero();
        Self {
            trace_id,
            parent_id: None,
            span_id: random_nonzero(),
            flags: root_flags(&trace_id),
            tracestate: None,
        }
    }

    /// The context of a span inside this one (a call to another service,
    /// a storage transaction, a step of a handler): the same trace, sampling
    /// and `tracestate`, a new span id, and this span as its parent.
    pub fn child(&self) -> Self {
        Self {
            trace_id: self.trace_id,
            // The first span of work that no span records is the root.
            parent_id: (self.span_id != NO_SPAN).then_some(self.span_id),
            span_id: random_nonzero(),
            flags: self.flags,
            tracestate: self.tracestate.clone(),
        }
    }

    /// The `traceparent` that names this span: what a call made inside it
    /// sends, so that the callee's span is its child.
    pub fn traceparent(&self) -> HeaderValue {
        if self.span_id == NO_SPAN {
            return self.child_traceparent();
        }
        let mut text = [0u8; 55];
        text[..3].copy_from_slice(b"00-");
        text[3..35].copy_from_slice(self.trace_id().as_bytes());
        text[35] = b'-';
        text[36..52].copy_from_slice(self.span_id().as_bytes());
        text[52] = b'-';
        text[53..].copy_from_slice(HexId::<2>::new(&[self.flags]).as_bytes());
        HeaderValue::from_bytes(&text).expect("hex digits are a valid header value")
    }

    /// The span a stored `traceparent` (and `tracestate`) names, as
    /// [`traceparent`](Self::traceparent) wrote it when work was queued:
    /// work taken from the queue continues the trace as a child of that span
    /// ([`child`](Self::child), or a consumer span of [`crate::otel`]).
    /// `None` if `traceparent` is not valid.
    pub fn from_traceparent(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        let (trace_id, span_id, flags) = parse_traceparent(traceparent.as_bytes())?;
        let mut headers = HeaderMap::new();
        if let Some(state) = tracestate.and_then(|s| HeaderValue::from_str(s).ok()) {
            headers.insert(TRACESTATE, state);
        }
        Some(Self {
            trace_id,
            parent_id: None,
            span_id,
            flags,
            tracestate: clean_tracestate(&headers),
        })
    }

    /// The raw ids: trace, span, parent span, flags.
    #[cfg(feature = "otel")]
    pub(crate) fn raw(&self) -> ([u8; 16], [u8; 8], Option<[u8; 8]>, u8) {
        (self.trace_id, self.span_id, self.parent_id, self.flags)
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

    /// A `traceparent` for an outgoing call that records no span of its
    /// own: same trace, a new parent id that no span will carry. Prefer
    /// [`child`](Self::child) and [`traceparent`](Self::traceparent), which
    /// name a span the chassis records (the downstream client does).
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
            .get::<RequestContext>()
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
    pub(crate) fn new(bytes: &[u8]) -> Self {
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

impl<const N: usize> serde::Serialize for HexId<N> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
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
pub(crate) fn parse_traceparent(v: &[u8]) -> Option<([u8; 16], [u8; 8], u8)> {
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
pub(crate) fn sample(value: &HeaderValue) -> String {
    value
        .as_bytes()
        .iter()
        .take(REJECTED_SAMPLE_LEN)
        .flat_map(|b| std::ascii::escape_default(*b))
        .map(char::from)
        .collect()
}

/// How often a request carries a header the front layers read.
#[derive(Clone, Copy)]
pub(super) enum Seen<'a> {
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
    pub(super) fn once(self) -> Option<&'a HeaderValue> {
        match self {
            Seen::Once(v) => Some(v),
            Seen::Absent | Seen::Repeated(_) => None,
        }
    }
}

/// The headers the front layers read: `x-correlation-id`, `traceparent` and
/// `x-timeout-ms`.
pub(super) struct Wanted<'a> {
    pub(super) correlation_id: Seen<'a>,
    pub(super) traceparent: Seen<'a>,
    pub(super) timeout_ms: Seen<'a>,
}

/// Up to this many header values, one pass comparing names finds the wanted
/// headers faster than hashing each wanted name for a lookup.
pub(crate) const SCAN_MAX_HEADERS: usize = 24;

impl<'a> Wanted<'a> {
    pub(super) fn scan(headers: &'a HeaderMap) -> Self {
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
                timeout_ms: seen(super::X_TIMEOUT_MS),
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
            } else if *name == super::X_TIMEOUT_MS {
                wanted.timeout_ms.add(value);
            }
        }
        wanted
    }
}

#[cfg(test)]
mod sampling_tests {
    use super::*;

    /// The share of `n` new traces' ids (UUIDv7, as the chassis makes them)
    /// that `sampled` picks.
    fn share(n: u32, sampled: impl Fn(&[u8; 16]) -> bool) -> f64 {
        let hits = (0..n)
            .filter(|_| sampled(&CorrelationId::generate_uuid().1))
            .count();
        hits as f64 / f64::from(n)
    }

    #[test]
    fn the_ratio_is_kept_for_the_ids_the_chassis_makes() {
        for ratio in [0.0, 0.01, 0.25, 0.5, 0.9, 1.0] {
            let t = threshold(ratio);
            let got = share(20_000, |id| below(id, t));
            // 20,000 draws: a standard deviation under 0.004.
            assert!((got - ratio).abs() < 0.02, "ratio {ratio}: sampled {got}");
        }
    }

    #[test]
    fn reading_the_last_63_bits_would_not_keep_it() {
        // The rule of OpenTelemetry's Rust SDK: the last 64 bits, shifted
        // right by one, below ratio × 2^63. A UUIDv7's variant bits make
        // those ids all fall between 2^62 and 2^62 + 2^61.
        let sdk = |ratio: f64, id: &[u8; 16]| {
            let low = u64::from_be_bytes(id[8..].try_into().unwrap()) >> 1;
            low < (ratio * (1u64 << 63) as f64) as u64
        };
        assert_eq!(share(5_000, |id| sdk(0.25, id)), 0.0);
        assert_eq!(share(5_000, |id| sdk(0.5, id)), 0.0);
        assert_eq!(share(5_000, |id| sdk(0.8, id)), 1.0);
    }

    #[test]
    fn a_child_names_a_new_span_under_its_parent() {
        let (_, uuid) = CorrelationId::generate_uuid();
        let mut headers = HeaderMap::new();
        let parent = format!("00-{}-00f067aa0ba902b7-01", HexId::<32>::new(&uuid));
        headers.insert(TRACEPARENT, HeaderValue::from_str(&parent).unwrap());
        headers.insert(TRACESTATE, HeaderValue::from_static("congo=t61rcWkgMzE"));
        let ctx = TraceContext::from_headers(&headers);
        let child = ctx.child();
        assert_eq!(child.trace_id(), ctx.trace_id());
        assert_eq!(child.parent_id(), Some(ctx.span_id()));
        assert_ne!(child.span_id(), ctx.span_id());
        assert!(child.sampled());
        assert_eq!(child.tracestate(), ctx.tracestate());
        let sent = child.traceparent();
        assert_eq!(
            sent.to_str().unwrap(),
            format!("00-{}-{}-01", ctx.trace_id(), child.span_id())
        );
        // What queued work stores and continues.
        let resumed =
            TraceContext::from_traceparent(sent.to_str().unwrap(), Some("congo=t61rcWkgMzE"))
                .unwrap();
        assert_eq!(resumed.trace_id(), ctx.trace_id());
        assert_eq!(resumed.span_id(), child.span_id());
        assert_eq!(resumed.child().parent_id(), Some(child.span_id()));
        assert_eq!(resumed.tracestate().unwrap(), "congo=t61rcWkgMzE");
        assert!(TraceContext::from_traceparent("00-nope", None).is_none());
    }
}
