//! Identifiers for the records a service creates.
//!
//! # The standard
//!
//! Records get a **UUIDv7** (RFC 9562): unique without coordination, and
//! ordered by creation time to the millisecond, so a primary key made of them
//! keeps B-tree inserts at the end of the index and a listing by id is a
//! listing by age. Ids shown to clients carry a short prefix naming the kind
//! of record (`ord_…`, `tkt_…`), so a misplaced id is recognisable at a
//! glance and in logs.
//!
//! # Example
//!
//! ```
//! let id = chassis::id::prefixed("ord");
//! assert!(id.starts_with("ord_") && id.len() == 4 + 36);
//! assert_eq!(chassis::id::uuid_v7().get_version_num(), 7);
//! ```

/// A fresh UUIDv7: the current Unix time in milliseconds, then random bits.
pub fn uuid_v7() -> uuid::Uuid {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let mut random = [0u8; 10];
    fastrand::fill(&mut random);
    uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid()
}

/// `<prefix>_<uuid v7>`, hyphenated and lowercase.
pub fn prefixed(prefix: &str) -> String {
    format!("{prefix}_{}", uuid_v7())
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_unique_and_ordered_by_time() {
        let a = super::uuid_v7();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = super::uuid_v7();
        assert_ne!(a, b);
        assert!(a < b, "{a} sorts before {b}");
        assert_eq!(b.get_variant(), uuid::Variant::RFC4122);
    }
}
