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
//! * **Settings** that name a moment (a version's sunset, say) are written
//!   in RFC 3339 (`2027-06-30T23:59:59Z`) or as a date (`2027-06-30`,
//!   midnight UTC that day) and read with [`Timestamp`].
//! * **HTTP headers** that carry a date (`Sunset`, RFC 8594) use the
//!   HTTP-date of RFC 9110 §5.6.7, `Wed, 30 Jun 2027 23:59:59 GMT`
//!   ([`http_date`]).
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
//!
//! let sunset: chassis::time::Timestamp = "2027-06-30T23:59:59Z".parse().unwrap();
//! assert_eq!(chassis::time::http_date(sunset.0), "Wed, 30 Jun 2027 23:59:59 GMT");
//! let day: chassis::time::Timestamp = "2027-06-30".parse().unwrap();
//! assert_eq!(chassis::time::unix_millis(day.0), 1_814_313_600_000);
//! ```

use std::time::{SystemTime, UNIX_EPOCH};

use ::time::{
    Date, OffsetDateTime, format_description::BorrowedFormatItem,
    format_description::well_known::Rfc3339, macros::format_description,
};

const RFC3339_MILLIS: &[BorrowedFormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");

/// RFC 9110's IMF-fixdate, the HTTP-date a sender generates.
const HTTP_DATE: &[BorrowedFormatItem<'static>] = format_description!(
    "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
);

const DATE: &[BorrowedFormatItem<'static>] = format_description!("[year]-[month]-[day]");

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

/// `t` as an HTTP-date (RFC 9110 §5.6.7, IMF-fixdate), to the second:
/// `Wed, 30 Jun 2027 23:59:59 GMT`; times before the epoch are the epoch.
pub fn http_date(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    i64::try_from(secs)
        .ok()
        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| t.format(HTTP_DATE).ok())
        .unwrap_or_else(|| "Thu, 01 Jan 1970 00:00:00 GMT".to_owned())
}

/// A moment read from a setting: RFC 3339 (`2027-06-30T23:59:59Z`, any
/// offset) or a date (`2027-06-30`, midnight UTC that day), after the Unix
/// epoch. Its `FromStr` is what
/// [`Reader`](crate::config::Reader) uses, e.g. for a version's sunset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub SystemTime);

impl std::str::FromStr for Timestamp {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = OffsetDateTime::parse(s, &Rfc3339)
            .or_else(|_| Date::parse(s, DATE).map(|d| d.midnight().assume_utc()))
            .map_err(|_| {
                "expected an RFC 3339 time (2027-06-30T23:59:59Z) or a date (2027-06-30)".to_owned()
            })?;
        let nanos = u64::try_from(t.unix_timestamp_nanos())
            .map_err(|_| "must be after 1970-01-01".to_owned())?;
        Ok(Self(UNIX_EPOCH + std::time::Duration::from_nanos(nanos)))
    }
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

    #[test]
    fn settings_and_headers_name_moments() {
        let t = |s: &str| s.parse::<Timestamp>().map(|t| unix_millis(t.0));
        assert_eq!(t("1994-11-06T08:49:37Z"), Ok(784_111_777_000));
        assert_eq!(t("1994-11-06T09:49:37+01:00"), Ok(784_111_777_000));
        assert_eq!(t("1994-11-06"), Ok(784_080_000_000));
        for bad in [
            "",
            "tomorrow",
            "1994-11-06T08:49:37",
            "1969-12-31",
            "06/11/1994",
        ] {
            assert!(t(bad).is_err(), "{bad}");
        }
        assert_eq!(
            http_date(UNIX_EPOCH + Duration::from_secs(784_111_777)),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
        assert_eq!(
            http_date(UNIX_EPOCH - Duration::from_secs(1)),
            "Thu, 01 Jan 1970 00:00:00 GMT"
        );
    }
}
