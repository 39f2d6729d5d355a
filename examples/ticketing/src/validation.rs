//! Request bodies, checked field by field with
//! [`chassis::validation::Fields`], so that one 422 names every invalid
//! field.
//!
//! A body is read as JSON first (malformed JSON is a 400 from the `Json`
//! extractor), then each field is taken from the object with its own check.
//! Deserializing straight into the typed request would stop at the first
//! bad field.

use chassis::validation::{Fields, Invalid, integer, string};
use http::HeaderMap;
use serde_json::Value;
use time::Date;

use crate::{
    client::{DATE_FORMAT, NewReservation, NewTicket},
    error::ApiError,
};

fn date(value: &Value) -> Result<Date, &'static str> {
    Date::parse(string(value)?, DATE_FORMAT).map_err(|_| "must be a date, YYYY-MM-DD")
}

/// The body of `POST /{account}/tickets`.
pub(crate) fn new_ticket(body: &Value) -> Result<NewTicket, Invalid> {
    let mut f = Fields::of(body)?;
    let name = f.required("name", |v| {
        let s = string(v)?;
        let ok = (1..=100).contains(&s.chars().count()) && !s.trim().is_empty();
        ok.then(|| s.to_owned())
            .ok_or("must be 1 to 100 characters, not only spaces")
    });
    let price_minor = f.required("price_minor", |v| {
        let n = integer(v)?;
        (n >= 0)
            .then_some(n)
            .ok_or("must be at least 0 (minor units, e.g. cents)")
    });
    let currency = f.required("currency", |v| {
        let s = string(v)?;
        let ok = s.len() == 3 && s.bytes().all(|b| b.is_ascii_uppercase());
        ok.then(|| s.to_owned())
            .ok_or("must be three capital letters (ISO 4217)")
    });
    let capacity = f.required("capacity", |v| {
        let n = integer(v)?;
        u32::try_from(n)
            .ok()
            .filter(|n| (1..=1_000_000).contains(n))
            .ok_or("must be from 1 to 1000000")
    });
    let valid_from = f.required("valid_from", date);
    let valid_until = f.required("valid_until", date);
    if let (Some(from), Some(until)) = (valid_from, valid_until)
        && from > until
    {
        f.error("valid_until", "must not be before valid_from");
    }
    f.finish(|| {
        Some(NewTicket {
            name: name?,
            price_minor: price_minor?,
            currency: currency?,
            capacity: capacity?,
            valid_from: valid_from?,
            valid_until: valid_until?,
        })
    })
}

/// The body of `POST /{account}/reservations`.
pub(crate) fn new_reservation(body: &Value) -> Result<NewReservation, Invalid> {
    let mut f = Fields::of(body)?;
    let ticket_id = f.required("ticket_id", |v| {
        let s = string(v)?;
        let ok = (1..=64).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        ok.then(|| s.to_owned())
            .ok_or("must be a ticket id: 1-64 characters of [A-Za-z0-9_-]")
    });
    let quantity = f.required("quantity", |v| {
        let n = integer(v)?;
        u32::try_from(n)
            .ok()
            .filter(|n| (1..=100).contains(n))
            .ok_or("must be from 1 to 100")
    });
    f.finish(|| {
        Some(NewReservation {
            ticket_id: ticket_id?,
            quantity: quantity?,
        })
    })
}

/// The optional `Idempotency-Key` header: 1 to 255 of `[A-Za-z0-9._~:-]`.
pub(crate) fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let mut values = headers.get_all(chassis::retry::IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .map_err(|_| ApiError::InvalidIdempotencyKey)?;
    let valid = values.next().is_none()
        && (1..=255).contains(&key.len())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_~:".contains(&b));
    if valid {
        Ok(Some(key))
    } else {
        Err(ApiError::InvalidIdempotencyKey)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn fields(e: &Invalid) -> Vec<String> {
        e.errors()
            .iter()
            .map(|e| e.pointer().trim_start_matches("#/").to_owned())
            .collect()
    }

    #[test]
    fn a_valid_ticket_is_read() {
        let t = new_ticket(&json!({
            "name": "Day pass", "price_minor": 4500, "currency": "EUR", "capacity": 100,
            "valid_from": "2026-12-01", "valid_until": "2027-04-30", "ignored": true,
        }))
        .unwrap();
        assert_eq!(
            (t.name.as_str(), t.price_minor, t.capacity),
            ("Day pass", 4500, 100)
        );
        assert_eq!(t.valid_until.to_string(), "2027-04-30");
    }

    #[test]
    fn every_invalid_field_is_named() {
        let e = new_ticket(&json!({
            "name": " ", "price_minor": -1, "currency": "eur", "capacity": 1_000_001,
            "valid_from": "2027-01-01", "valid_until": "2026-01-01",
        }))
        .unwrap_err();
        assert_eq!(
            fields(&e),
            ["name", "price_minor", "currency", "capacity", "valid_until"]
        );
        let e =
            new_ticket(&json!({"name": 7, "price_minor": 1.5, "valid_from": "1 May"})).unwrap_err();
        assert_eq!(
            fields(&e),
            [
                "name",
                "price_minor",
                "currency",
                "capacity",
                "valid_from",
                "valid_until"
            ]
        );
        let e = new_reservation(&json!({"ticket_id": "", "quantity": 101})).unwrap_err();
        assert_eq!(fields(&e), ["ticket_id", "quantity"]);
        let e = new_reservation(&json!([1])).unwrap_err();
        assert_eq!(e.errors()[0].pointer(), "#");
    }

    #[test]
    fn idempotency_keys_are_checked() {
        let mut h = HeaderMap::new();
        assert_eq!(idempotency_key(&h).unwrap(), None);
        h.insert("idempotency-key", "order-1:a.b~c_d".parse().unwrap());
        assert_eq!(idempotency_key(&h).unwrap(), Some("order-1:a.b~c_d"));
        for bad in ["", "with space", "é", &"k".repeat(256)] {
            let mut h = HeaderMap::new();
            h.insert(
                "idempotency-key",
                http::HeaderValue::from_bytes(bad.as_bytes()).unwrap(),
            );
            assert!(idempotency_key(&h).is_err(), "{bad:?}");
        }
    }
}
