//! The headers a message carries, and reading them from what arrived.

use async_nats::HeaderMap;

/// The correlation id, as on HTTP.
pub const X_CORRELATION_ID: &str = "x-correlation-id";
/// W3C trace context, as on HTTP.
pub const TRACEPARENT: &str = "traceparent";
/// W3C trace state, as on HTTP.
pub const TRACESTATE: &str = "tracestate";
/// `Bearer <publisher's own service token>`.
pub const AUTHORIZATION: &str = "authorization";
/// The payload's media type.
pub const CONTENT_TYPE: &str = "content-type";
/// The event id, JetStream's de-duplication key.
pub const NATS_MSG_ID: &str = "Nats-Msg-Id";
/// The media type of JSON payloads.
pub const JSON: &str = "application/json";

/// On a dead letter: the reason code it was dead-lettered for.
pub const DLQ_REASON: &str = "x-dlq-reason";
/// On a dead letter: the last error, for operators (at most 1 KiB).
pub const DLQ_ERROR: &str = "x-dlq-error";
/// On a dead letter: the subject it was published to.
pub const DLQ_SUBJECT: &str = "x-dlq-subject";
/// On a dead letter: the stream it came from.
pub const DLQ_STREAM: &str = "x-dlq-stream";
/// On a dead letter: its sequence in that stream.
pub const DLQ_SEQUENCE: &str = "x-dlq-stream-sequence";
/// On a dead letter: how many times it was delivered.
pub const DLQ_DELIVERIES: &str = "x-dlq-deliveries";
/// On a dead letter: the consumer that gave it up.
pub const DLQ_CONSUMER: &str = "x-dlq-consumer";
/// On a dead letter: the publisher's verified identity (`sub`), when it had one.
pub const DLQ_PUBLISHER: &str = "x-dlq-publisher";
/// On a dead letter: the original `Nats-Msg-Id`.
pub const DLQ_EVENT_ID: &str = "x-dlq-event-id";

/// The longest error text a dead letter carries.
pub(crate) const MAX_ERROR_LEN: usize = 1024;

/// The longest event id.
pub const MAX_EVENT_ID_LEN: usize = 128;

/// Whether `id` is an event id: 1 to 128 characters of `[A-Za-z0-9._~:-]`
/// (the grammar of correlation ids: safe in headers, logs and subjects of
/// audit lines).
pub fn is_event_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_EVENT_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b':' | b'-'))
}

/// The values of header `name`, matched without regard to case (NATS
/// headers are case-sensitive; publishers outside the chassis may write
/// `Authorization`).
pub(crate) fn values<'a>(headers: &'a HeaderMap, name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(k, _)| {
            let k: &str = k.as_ref();
            k.eq_ignore_ascii_case(name)
        })
        .flat_map(|(_, v)| v.iter().map(|v| v.as_str()))
        .collect()
}

/// The value of header `name` when it is there exactly once.
pub(crate) fn single<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    match values(headers, name).as_slice() {
        [one] => Some(one),
        _ => None,
    }
}

/// The message's `Authorization` values as an HTTP header map, for the
/// verifier (which refuses none, or more than one, as on HTTP).
pub(crate) fn authorization(headers: &HeaderMap) -> http::HeaderMap {
    let mut out = http::HeaderMap::new();
    for v in values(headers, AUTHORIZATION) {
        // A value that is not a valid HTTP header value is malformed; an
        // empty one says so to the verifier.
        let value = http::HeaderValue::from_str(v)
            .unwrap_or_else(|_| http::HeaderValue::from_static("invalid"));
        out.append(http::header::AUTHORIZATION, value);
    }
    out
}

/// `text` fit for a header value: CR and LF replaced, cut to
/// [`MAX_ERROR_LEN`] bytes on a character boundary.
pub(crate) fn header_safe(text: &str) -> String {
    let mut end = text.len().min(MAX_ERROR_LEN);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].replace(['\r', '\n'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids() {
        assert!(is_event_id("evt_0193a-b:c.d~e"));
        for bad in ["", "a b", "a\nb", "é", &"a".repeat(129)] {
            assert!(!is_event_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn headers_are_found_whatever_their_case() {
        let mut h = HeaderMap::new();
        h.insert("Authorization", "Bearer a.b.c");
        assert_eq!(single(&h, AUTHORIZATION), Some("Bearer a.b.c"));
        assert_eq!(authorization(&h).len(), 1);
        h.insert("authorization", "Bearer d.e.f");
        assert_eq!(single(&h, AUTHORIZATION), None, "two values");
        assert_eq!(authorization(&h).len(), 2);
    }

    #[test]
    fn errors_are_made_header_safe() {
        assert_eq!(header_safe("a\r\nb"), "a  b");
        let long = "é".repeat(1000);
        let cut = header_safe(&long);
        assert!(cut.len() <= MAX_ERROR_LEN && cut.chars().all(|c| c == 'é'));
    }
}
