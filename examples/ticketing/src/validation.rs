//! Request bodies, checked field by field so that one answer names every
//! invalid field.
//!
//! A body is read as JSON first (malformed JSON is a 400 from the `Json`
//! extractor), then each field is taken from the object with its own check.
//! Deserializing straight into the typed request would stop at the first
//! bad field.

use http::HeaderMap;
use serde_json::{Map, Value};
use time::Date;

use crate::{
    client::{DATE_FORMAT, NewReservation, NewTicket},
    error::{ApiError, FieldError},
};

/// The fields of one JSON object, and the problems found so far.
struct Fields<'a> {
    object: &'a Map<String, Value>,
    errors: Vec<FieldError>,
}

impl<'a> Fields<'a> {
    fn of(body: &'a Value) -> Result<Self, ApiError> {
        let object = body.as_object().ok_or(ApiError::NotAnObject)?;
        Ok(Self {
            object,
            errors: Vec::new(),
        })
    }

    /// The field `name` checked by `check`; `None` (and a problem recorded)
    /// when it is missing, `null` or refused.
    fn take<T>(
        &mut self,
        name: &'static str,
        check: impl FnOnce(&'a Value) -> Result<T, &'static str>,
    ) -> Option<T> {
        let result = match self.object.get(name) {
            None | Some(Value::Null) => Err("is required"),
            Some(value) => check(value),
        };
        result.map_err(|message| self.error(name, message)).ok()
    }

    fn error(&mut self, field: &'static str, message: &'static str) {
        self.errors.push(FieldError { field, message });
    }

    /// Every problem found, or the value built from the fields (all of them
    /// `Some` when there was no problem).
    fn finish_with<T>(self, build: impl FnOnce() -> Option<T>) -> Result<T, ApiError> {
        if !self.errors.is_empty() {
            return Err(ApiError::Invalid(self.errors));
        }
        build().ok_or(ApiError::Invalid(Vec::new()))
    }
}

fn string(value: &Value) -> Result<&str, &'static str> {
    value.as_str().ok_or("must be a string")
}

fn integer(value: &Value) -> Result<i64, &'static str> {
    value.as_i64().ok_or("must be a whole number")
}

fn date(value: &Value) -> Result<Date, &'static str> {
    Date::parse(string(value)?, DATE_FORMAT).map_err(|_| "must be a date, YYYY-MM-DD")
}

/// The body of `POST /{account}/tickets`.
pub(crate) fn new_ticket(body: &Value) -> Result<NewTicket, ApiError> {
    let mut f = Fields::of(body)?;
    let name = f.take("name", |v| {
        let s = string(v)?;
        let ok = (1..=100).contains(&s.chars().count()) && !s.trim().is_empty();
        ok.then(|| s.to_owned())
            .ok_or("must be 1 to 100 characters, not only spaces")
    });
    let price_minor = f.take("price_minor", |v| {
        let n = integer(v)?;
        (n >= 0)
            .then_some(n)
            .ok_or("must be at least 0 (minor units, e.g. cents)")
    });
    let currency = f.take("currency", |v| {
        let s = string(v)?;
        let ok = s.len() == 3 && s.bytes().all(|b| b.is_ascii_uppercase());
        ok.then(|| s.to_owned())
            .ok_or("must be three capital letters (ISO 4217)")
    });
    let capacity = f.take("capacity", |v| {
        let n = integer(v)?;
        u32::try_from(n)
            .ok()
            .filter(|n| (1..=1_000_000).contains(n))
            .ok_or("must be from 1 to 1000000")
    });
    let valid_from = f.take("valid_from", date);
    let valid_until = f.take("valid_until", date);
    if let (Some(from), Some(until)) = (valid_from, valid_until)
        && from > until
    {
        f.error("valid_until", "must not be before valid_from");
    }
    f.finish_with(|| {
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
pub(crate) fn new_reservation(body: &Value) -> Result<NewReservation, ApiError> {
    let mut f = Fields::of(body)?;
    let ticket_id = f.take("ticket_id", |v| {
        let s = string(v)?;
        (1..=128)
            .contains(&s.len())
            .then(|| s.to_owned())
            .ok_or("must be a ticket id")
    });
    let quantity = f.take("quantity", |v| {
        let n = integer(v)?;
        u32::try_from(n)
            .ok()
            .filter(|n| (1..=100).contains(n))
            .ok_or("must be from 1 to 100")
    });
    f.finish_with(|| {
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

    fn fields(e: ApiError) -> Vec<&'static str> {
        match e {
            ApiError::Invalid(errors) => errors.iter().map(|e| e.field).collect(),
            other => panic!("not a validation error: {other}"),
        }
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
            fields(e),
            ["name", "price_minor", "currency", "capacity", "valid_until"]
        );
        let e =
            new_ticket(&json!({"name": 7, "price_minor": 1.5, "valid_from": "1 May"})).unwrap_err();
        assert_eq!(
            fields(e),
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
        assert_eq!(fields(e), ["ticket_id", "quantity"]);
        assert!(matches!(
            new_reservation(&json!([1])),
            Err(ApiError::NotAnObject)
        ));
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
