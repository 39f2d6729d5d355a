//! The JSON line writer: the shape of the chassis' log lines, the escaping
//! and time formatting they share, and the installed log's writer.
//!
//! The log format ([`telemetry`](crate::telemetry)) and the audit log sink
//! ([`audit`](crate::audit)) both write lines of the same shape through this
//! module: [`JsonLines`] begins and ends a line and hands whole lines to the
//! [`LogWriter`], which never blocks the request that wrote them.

use std::{cell::RefCell, fmt, io::Write as _, time::SystemTime};

use axum::extract::MatchedPath;

mod writer;

pub(crate) use writer::{LogWriter, WriterGuard};

/// The installed JSON log's writer, for a producer that formats whole lines
/// of the same shape itself (the audit log sink, which writes a batch of
/// events as one message instead of one event each through `tracing`).
/// Set only when [`init`] installed the JSON format.
/// The ids a line of a request carries: validated ASCII, nothing to
/// escape. An empty `span_id` is left out.
#[derive(Clone, Copy)]
pub(crate) struct LineIds<'a> {
    pub(crate) correlation_id: &'a [u8],
    pub(crate) trace_id: &'a [u8],
    pub(crate) span_id: &'a [u8],
}

pub(crate) static JSON_LINES: std::sync::OnceLock<JsonLines> = std::sync::OnceLock::new();

/// See [`JSON_LINES`].
#[derive(Clone)]
pub(crate) struct JsonLines {
    /// The service name as a JSON string, quotes included.
    service: Box<[u8]>,
    writer: LogWriter,
}

/// The JSON log installed by [`init`], if any.
#[inline]
pub(crate) fn json_lines() -> Option<&'static JsonLines> {
    JSON_LINES.get()
}

impl JsonLines {
    /// Starts a line as [`JsonLayer`] does (`target` and `message` are
    /// literals of this crate and the ids validated, so they are not
    /// escaped; the service name was escaped once): `{"time":..,"level":"INFO",
    /// "target":..,"service":..`, the request's `correlation_id` and
    /// `trace_id` when given (as the request span adds them), then
    /// `"message":..`; the caller adds `,"field":value` pairs and ends it
    /// with [`end_line`](Self::end_line).
    #[inline]
    pub(crate) fn begin_line(
        &self,
        buf: &mut Vec<u8>,
        time: SystemTime,
        target: &str,
        request: Option<LineIds<'_>>,
        message: &str,
    ) {
        buf.extend_from_slice(b"{\"time\":\"");
        write_rfc3339(buf, time);
        write_field(buf, "\",\"level\":\"INFO\",\"target\":\"", target, false);
        buf.extend_from_slice(b",\"service\":");
        buf.extend_from_slice(&self.service);
        if let Some(ids) = request {
            // Validated ids: nothing to escape.
            buf.extend_from_slice(b",\"correlation_id\":\"");
            buf.extend_from_slice(ids.correlation_id);
            buf.extend_from_slice(b"\",\"trace_id\":\"");
            buf.extend_from_slice(ids.trace_id);
            buf.push(b'"');
            if !ids.span_id.is_empty() {
                buf.extend_from_slice(b",\"span_id\":\"");
                buf.extend_from_slice(ids.span_id);
                buf.push(b'"');
            }
        }
        write_field(buf, ",\"message\":\"", message, false);
    }

    /// Lines for `service` to `writer`, without installing anything.
    pub(crate) fn new(service: &str, writer: LogWriter) -> Self {
        Self {
            service: quoted(service),
            writer,
        }
    }

    /// Ends a line.
    #[inline]
    pub(crate) fn end_line(buf: &mut Vec<u8>) {
        buf.extend_from_slice(b"}\n");
    }

    /// Hands whole lines to the log writer.
    #[inline]
    pub(crate) fn write(&self, lines: &[u8]) {
        self.writer.write(lines);
    }
}

thread_local! {
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
}

/// Runs `f` with this thread's empty line buffer; a re-entrant call (an
/// event logged while a line is formatted) gets a buffer of its own.
#[inline]
pub(crate) fn with_line(f: impl FnOnce(&mut Vec<u8>)) {
    LINE.with(|line| {
        let mut fresh = Vec::new();
        let mut borrowed = line.try_borrow_mut();
        let buf = match borrowed.as_deref_mut() {
            Ok(buf) => buf,
            Err(_) => &mut fresh,
        };
        buf.clear();
        f(buf);
    });
}

/// `fmt::Write` that escapes for the inside of a JSON string.
pub(crate) struct Escaper<'a>(pub(crate) &'a mut Vec<u8>);

impl fmt::Write for Escaper<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        escape_into(self.0, s);
        Ok(())
    }
}

/// `n` in decimal, without the formatting machinery.
#[inline]
pub(crate) fn write_u64(buf: &mut Vec<u8>, n: u64) {
    buf.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// `s` as a JSON string, quotes included.
pub(crate) fn quoted(s: &str) -> Box<[u8]> {
    let mut buf = Vec::with_capacity(s.len() + 2);
    write_json_str(&mut buf, s);
    buf.into_boxed_slice()
}

/// Appends a string member: `key` is the literal before the value, up to
/// and including its opening quote (`,"name":"`), so a member costs one
/// copy for its name and punctuation, one for the value and the closing
/// quote. The value is escaped when `escape`; with `escape` false it is
/// copied as it is, which is only for text that cannot need escaping by
/// construction (a validated grammar such as a correlation id, an account,
/// a permission, an HTTP method, or a literal of this crate).
#[inline]
pub(crate) fn write_field(buf: &mut Vec<u8>, key: &'static str, value: &str, escape: bool) {
    buf.extend_from_slice(key.as_bytes());
    if escape {
        escape_into(buf, value);
    } else {
        debug_assert!(!needs_escape(value.as_bytes()), "{value:?} needs escaping");
        buf.extend_from_slice(value.as_bytes());
    }
    buf.push(b'"');
}

#[inline]
pub(crate) fn write_json_str(buf: &mut Vec<u8>, s: &str) {
    buf.push(b'"');
    escape_into(buf, s);
    buf.push(b'"');
}

/// Whether any of the 8 bytes of `x` needs escaping in a JSON string: a
/// control character (below 0x20, or 0x7f), `"` or `\\`. Bytes of 0x80 and
/// above (UTF-8) never do. Exact: the classic "has a byte less than n" and
/// "has a zero byte" tests, which report whether any byte matches, not which.
#[inline]
pub(crate) fn word_needs_escape(x: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let has_zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH != 0;
    let below_space = x.wrapping_sub(ONES * 0x20) & !x & HIGH != 0;
    below_space
        || has_zero(x ^ (ONES * u64::from(b'"')))
        || has_zero(x ^ (ONES * u64::from(b'\\')))
        || has_zero(x ^ (ONES * 0x7f))
}

#[inline]
pub(crate) fn escape_into(buf: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    // Most text needs no escape: check it whole, then copy it once.
    if !needs_escape(bytes) {
        buf.extend_from_slice(bytes);
        return;
    }
    escape_each(buf, bytes);
}

/// The 8 bytes of `b` from `i` (which the caller keeps in bounds).
#[inline]
fn word_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(
        b.get(i..i + 8)
            .and_then(|w| w.try_into().ok())
            .unwrap_or([0; 8]),
    )
}

/// Whether any byte of `bytes` needs escaping, a word at a time: a short
/// string is padded with spaces, and the tail of a longer one is checked as
/// its last 8 bytes (overlapping the previous word), never byte by byte.
#[inline]
fn needs_escape(bytes: &[u8]) -> bool {
    let n = bytes.len();
    if n < 8 {
        let mut w = [b' '; 8];
        w[..n].copy_from_slice(bytes);
        return word_needs_escape(u64::from_le_bytes(w));
    }
    let mut i = 0;
    while i + 8 <= n {
        if word_needs_escape(word_at(bytes, i)) {
            return true;
        }
        i += 8;
    }
    i < n && word_needs_escape(word_at(bytes, n - 8))
}

/// How many clean route templates each thread remembers, see
/// [`route_is_clean`].
const CLEAN_ROUTE_SLOTS: usize = 8;

thread_local! {
    static CLEAN_ROUTES: std::cell::RefCell<[Option<MatchedPath>; CLEAN_ROUTE_SLOTS]> =
        const { std::cell::RefCell::new([const { None }; CLEAN_ROUTE_SLOTS]) };
}

/// Whether `route` needs no escaping in a JSON string. A template found
/// clean is remembered by this thread (the entry holds it, so its address
/// cannot be reused by other text), and the same template, by address and
/// length, is not scanned again: the access line and the audit line of
/// every request carry the route.
#[inline]
pub(crate) fn route_is_clean(route: &MatchedPath) -> bool {
    let text = route.as_str();
    let slot = (text.as_ptr() as usize >> 4) % CLEAN_ROUTE_SLOTS;
    CLEAN_ROUTES.with_borrow_mut(|routes| {
        if routes[slot]
            .as_ref()
            .is_some_and(|r| std::ptr::eq(r.as_str(), text))
        {
            return true;
        }
        if needs_escape(text.as_bytes()) {
            return false;
        }
        routes[slot] = Some(route.clone());
        true
    })
}

/// Escapes `bytes`, which needs it somewhere.
fn escape_each(buf: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    buf.reserve(bytes.len() + 8);
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        // Skip clean runs eight bytes at a time: most text needs no escape.
        if let Some(chunk) = bytes.get(i..i + 8) {
            let word = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
            if !word_needs_escape(word) {
                i += 8;
                continue;
            }
        }
        let b = bytes[i];
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f | 0x7f => b"",
            _ => {
                i += 1;
                continue;
            }
        };
        buf.extend_from_slice(&bytes[start..i]);
        if esc.is_empty() {
            buf.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]);
        } else {
            buf.extend_from_slice(esc);
        }
        i += 1;
        start = i;
    }
    buf.extend_from_slice(&bytes[start..]);
}

thread_local! {
    /// The last second formatted, `YYYY-MM-DDTHH:MM:SS`, and its value.
    static SECOND: std::cell::Cell<(u64, [u8; 19])> = const { std::cell::Cell::new((u64::MAX, [0; 19])) };
}

/// Writes `t` as `YYYY-MM-DDTHH:MM:SS.uuuuuuZ`. The date and time part is
/// formatted once per second per thread; the microseconds by hand.
#[inline]
pub(crate) fn write_rfc3339(buf: &mut Vec<u8>, t: SystemTime) {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (cached, mut text) = SECOND.get();
    if cached != secs {
        text = civil(secs);
        SECOND.set((secs, text));
    }
    buf.extend_from_slice(&text);
    let mut micros = d.subsec_micros();
    let mut digits = [b'0'; 6];
    for slot in digits.iter_mut().rev() {
        *slot = b'0' + (micros % 10) as u8;
        micros /= 10;
    }
    buf.push(b'.');
    buf.extend_from_slice(&digits);
    buf.push(b'Z');
}

/// `YYYY-MM-DDTHH:MM:SS` of a Unix time.
fn civil(secs: u64) -> [u8; 19] {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = [0u8; 19];
    let mut w = &mut out[..];
    let _ = write!(
        w,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    let _ = &mut w;
    out
}
