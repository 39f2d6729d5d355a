//! Timestamps as services store and show them.
//!
//! # The standard
//!
//! * **Stored** times are wall-clock milliseconds since the Unix epoch in
//!   an integer column ([`now_millis`], [`unix_millis`]): they sort, compare
//!   and survive a restart, and a monotonic clock's reading would not.
//! * **Shown** times (API bodies, mail headers, logs) are RFC 3339 in UTC
//!   with exactly three fractional digits and `Z`
//!   (`2026-12-04T17:40:00.000Z`, [`rfc3339_millis`], [`now_rfc3339`]):
//!   one width, so they also sort as text, and the same form as the log
//!   lines' `time`.
//!
//! # Example
//!
//! ```
//! use std::time::{Duration, UNIX_EPOCH};
//!
//! let t = UNIX_EPOCH + Duration::from_millis(1_709_210_096_789);
//! let ms = chassis::time::unix_millis(t);
//! assert_eq!(ms, 1_709_210_096_789);
//! assert_eq!(chassis::time::rfc3339_millis(ms), "2024-02-29T12:34:56.789Z");
//! assert!(chassis::time::now_millis() > ms);
//! assert!(chassis::time::now_rfc3339().ends_with('Z'));
//! ```

use std::time::{SystemTime, UNIX_EPOCH};

use ::time::{OffsetDateTime, format_description::BorrowedFormatItem, macros::format_description};

const RFC3339_MILLIS: &[BorrowedFormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");

/// Milliseconds from the Unix epoch to `t` (0 before it, `i64::MAX` past
/// what an `i64` holds).
pub fn unix_millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Milliseconds since the Unix epoch, now (wall clock).
pub fn now_millis() -> i64 {
    unix_millis(SystemTime::now())
}

/// `ms` milliseconds since the epoch as RFC 3339 in UTC,
/// `2026-01-01T00:00:00.000Z`; times before the epoch or after the year
/// 9999 are clamped to those bounds.
pub fn rfc3339_millis(ms: i64) -> String {
    const MAX_MS: i64 = 253_402_300_799_999; // 9999-12-31T23:59:59.999Z
    let ms = ms.clamp(0, MAX_MS);
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(RFC3339_MILLIS).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00.000Z".to_owned())
}

/// Now, as RFC 3339 in UTC with milliseconds.
pub fn now_rfc3339() -> String {
    rfc3339_millis(now_millis())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn formats_are_fixed_width_and_utc() {
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_millis(-5), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_millis(4_102_444_799_000),
            "2099-12-31T23:59:59.000Z"
        );
        assert_eq!(rfc3339_millis(i64::MAX), "9999-12-31T23:59:59.999Z");
        assert_eq!(unix_millis(UNIX_EPOCH - Duration::from_secs(1)), 0);
        let a = now_rfc3339();
        std::thread::sleep(Duration::from_millis(2));
        assert!(a < now_rfc3339(), "sorts as text");
    }
}
