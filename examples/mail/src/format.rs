//! Internet Message Format (RFC 5322) for the one kind of mail this service
//! sends: a plain-text UTF-8 body, quoted-printable, and a few headers.
//!
//! Every header value comes from validated input (addresses checked by
//! [`parse_address`], ids of a fixed grammar, subjects built from them), so no
//! value can carry a line break into the header block.

use std::time::{SystemTime, UNIX_EPOCH};

use lettre::Address;

/// Longest address accepted (RFC 5321's path limit, less the brackets).
const MAX_ADDRESS_LEN: usize = 254;

/// A mail ready to hand to a transport.
#[derive(Debug, Clone)]
pub(crate) struct Email {
    /// The job's id, which names the file of the file transport.
    pub(crate) message_id: String,
    /// The SMTP envelope.
    pub(crate) from: Address,
    /// The SMTP envelope recipient.
    pub(crate) to: Address,
    /// The formatted message, CRLF line ends.
    pub(crate) bytes: Vec<u8>,
}

/// What a template produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rendered {
    /// The subject, ASCII.
    pub(crate) subject: String,
    /// The body, UTF-8, `\n` line ends.
    pub(crate) body: String,
}

/// Everything the header block says.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Headers<'a> {
    pub(crate) from: &'a Address,
    pub(crate) to: &'a Address,
    pub(crate) message_id: &'a str,
    pub(crate) correlation_id: &'a str,
    pub(crate) date: SystemTime,
}

/// Parses an address as this service accepts it: ASCII, no spaces or
/// control characters, at most 254 characters, `local@domain`.
pub(crate) fn parse_address(text: &str) -> Result<Address, &'static str> {
    if text.is_empty() {
        return Err("must not be empty");
    }
    if text.len() > MAX_ADDRESS_LEN {
        return Err("must be at most 254 characters");
    }
    if !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be ASCII without spaces");
    }
    text.parse::<Address>()
        .map_err(|_| "must be an email address (local@domain)")
}

/// The `Message-ID` of the mail for `message_id`, from `domain`: the same
/// job always gets the same header, so a second copy sent after a crash is
/// recognisable. Characters outside RFC 5322's `atext` (`.` and `:`) and
/// `=` itself are written `=XX`, which keeps the mapping one-to-one.
pub(crate) fn message_id_header(message_id: &str, domain: &str) -> String {
    let mut left = String::with_capacity(message_id.len() + 8);
    for b in message_id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'~' | b'-') {
            left.push(char::from(b));
        } else {
            left.push_str(&format!("={b:02X}"));
        }
    }
    format!("<{left}@{domain}>")
}

/// The formatted message.
pub(crate) fn message(h: &Headers<'_>, rendered: &Rendered) -> Vec<u8> {
    let mut out = String::with_capacity(512 + rendered.body.len() * 2);
    let mut header = |name: &str, value: &str| {
        out.push_str(name);
        out.push_str(": ");
        out.push_str(value);
        out.push_str("\r\n");
    };
    header("Date", &rfc5322_date(h.date));
    header("From", h.from.as_ref());
    header("To", h.to.as_ref());
    header("Subject", &rendered.subject);
    header(
        "Message-ID",
        &message_id_header(h.message_id, h.from.domain()),
    );
    header("X-Correlation-ID", h.correlation_id);
    header("MIME-Version", "1.0");
    header("Content-Type", "text/plain; charset=utf-8");
    header("Content-Transfer-Encoding", "quoted-printable");
    out.push_str("\r\n");
    out.push_str(&quoted_printable(&rendered.body));
    out.into_bytes()
}

/// Quoted-printable (RFC 2045 §6.7) with CRLF line ends and lines of at
/// most 76 characters.
pub(crate) fn quoted_printable(text: &str) -> String {
    const MAX: usize = 76;
    let mut out = String::with_capacity(text.len() + text.len() / 8);
    for line in text.lines() {
        let bytes = line.as_bytes();
        let mut len = 0;
        for (i, &b) in bytes.iter().enumerate() {
            let last = i + 1 == bytes.len();
            let literal =
                (b.is_ascii_graphic() && b != b'=') || ((b == b' ' || b == b'\t') && !last);
            let token_len = if literal { 1 } else { 3 };
            // Keep room for the soft break's `=` unless this ends the line.
            let room = if last { MAX } else { MAX - 1 };
            if len + token_len > room {
                out.push_str("=\r\n");
                len = 0;
            }
            if literal {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("={b:02X}"));
            }
            len += token_len;
        }
        out.push_str("\r\n");
    }
    out
}

/// `Thu, 01 Jan 2026 00:00:00 +0000`.
pub(crate) fn rfc5322_date(t: SystemTime) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let days = secs / 86_400;
    let (y, m, d) = civil_from_days(days);
    let rem = secs % 86_400;
    format!(
        "{}, {d:02} {} {y} {:02}:{:02}:{:02} +0000",
        DAYS[(days % 7) as usize],
        MONTHS[(m - 1) as usize],
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Year, month (1-12) and day (1-31) of a day count since 1970-01-01
/// (Howard Hinnant's `civil_from_days`, for days on or after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn dates_are_formatted_as_the_rfcs_say() {
        assert_eq!(rfc5322_date(UNIX_EPOCH), "Thu, 01 Jan 1970 00:00:00 +0000");
        let t = UNIX_EPOCH + Duration::from_secs(1_709_210_096); // 2024-02-29 12:34:56
        assert_eq!(rfc5322_date(t), "Thu, 29 Feb 2024 12:34:56 +0000");
        assert_eq!(
            chassis::time::rfc3339_millis(1_709_210_096_789),
            "2024-02-29T12:34:56.789Z"
        );
        assert_eq!(chassis::time::rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_secs(4_102_444_799); // 2099-12-31 23:59:59
        assert_eq!(rfc5322_date(t), "Thu, 31 Dec 2099 23:59:59 +0000");
        assert_eq!(chassis::time::unix_millis(t), 4_102_444_799_000);
    }

    #[test]
    fn message_ids_map_one_to_one_onto_atext() {
        assert_eq!(
            message_id_header("evt-1_a~b", "chassis.example"),
            "<evt-1_a~b@chassis.example>"
        );
        assert_eq!(
            message_id_header("a.b:c", "x.example"),
            "<a=2Eb=3Ac@x.example>"
        );
        assert_ne!(message_id_header("a.b", "x"), message_id_header("a:b", "x"));
    }

    #[test]
    fn quoted_printable_keeps_text_readable_and_lines_short() {
        assert_eq!(quoted_printable("hello\nworld"), "hello\r\nworld\r\n");
        assert_eq!(quoted_printable("a=b"), "a=3Db\r\n");
        assert_eq!(quoted_printable("trailing "), "trailing=20\r\n");
        assert_eq!(quoted_printable("Zürich"), "Z=C3=BCrich\r\n");
        let long = "x".repeat(200);
        let encoded = quoted_printable(&long);
        assert!(encoded.split("\r\n").all(|l| l.len() <= 76), "{encoded}");
        let decoded: String = encoded.replace("=\r\n", "").replace("\r\n", "");
        assert_eq!(decoded, long);
        let accents = "é".repeat(60);
        assert!(
            quoted_printable(&accents)
                .split("\r\n")
                .all(|l| l.len() <= 76)
        );
    }

    #[test]
    fn addresses_are_checked() {
        assert!(parse_address("alice@example.com").is_ok());
        for bad in [
            "",
            "alice",
            "alice@",
            "@example.com",
            "a b@example.com",
            "alice@example.com\r\nBcc: x@y.z",
            "zoë@example.com",
        ] {
            assert!(parse_address(bad).is_err(), "{bad:?}");
        }
        assert!(parse_address(&format!("{}@example.com", "a".repeat(250))).is_err());
    }

    #[test]
    fn a_message_has_its_headers_and_body() {
        let from: Address = "tickets@chassis.example".parse().unwrap();
        let to: Address = "alice@example.com".parse().unwrap();
        let h = Headers {
            from: &from,
            to: &to,
            message_id: "evt-1",
            correlation_id: "corr-1",
            date: UNIX_EPOCH,
        };
        let r = Rendered {
            subject: "Hi".to_owned(),
            body: "Line one\nLine two".to_owned(),
        };
        let text = String::from_utf8(message(&h, &r)).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains("\r\nTo: alice@example.com\r\n"), "{head}");
        assert!(head.contains("\r\nMessage-ID: <evt-1@chassis.example>\r\n"));
        assert!(head.contains("\r\nX-Correlation-ID: corr-1\r\n"));
        assert!(head.starts_with("Date: Thu, 01 Jan 1970 00:00:00 +0000\r\n"));
        assert_eq!(body, "Line one\r\nLine two\r\n");
    }
}
