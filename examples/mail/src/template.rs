//! The templates: what data each needs, and the text it makes.

use serde_json::Value;

use crate::{
    client::{ORDER_CONFIRMATION, OrderConfirmation, SOLD_OUT, SoldOut, is_valid_message_id},
    format::Rendered,
};
use chassis::validation::{FieldError, Invalid};

/// Longest free-text member of a template's data, in characters.
const MAX_TEXT: usize = 200;

/// Checks `data` for `template` (known to be one of
/// [`TEMPLATES`](crate::client::TEMPLATES)), adding a problem per invalid
/// member to `errors`.
pub(crate) fn validate(template: &str, data: &Value, errors: &mut Invalid) {
    match template {
        ORDER_CONFIRMATION => validate_order_confirmation(data, errors),
        SOLD_OUT => validate_sold_out(data, errors),
        _ => {}
    }
}

/// The subject and body of `template` over `data`.
///
/// # Errors
///
/// A description when `data` does not fit the template (only for data
/// stored by another version of the service: jobs are validated when they
/// are accepted).
pub(crate) fn render(template: &str, data: &Value) -> Result<Rendered, String> {
    match template {
        ORDER_CONFIRMATION => {
            typed(template, data, validate_order_confirmation).map(|o| order_confirmation(&o))
        }
        SOLD_OUT => typed(template, data, validate_sold_out).map(|p| sold_out(&p)),
        other => Err(format!("unknown template `{other}`")),
    }
}

/// `data` as `T`, once `validate` finds nothing wrong with it.
fn typed<T: serde::de::DeserializeOwned>(
    template: &str,
    data: &Value,
    validate: fn(&Value, &mut Invalid),
) -> Result<T, String> {
    let mut errors = Invalid::new();
    validate(data, &mut errors);
    if let Some(e) = errors.errors().first() {
        return Err(format!("{}: {}", e.pointer(), e.detail()));
    }
    serde_json::from_value(data.clone()).map_err(|e| format!("data does not fit {template}: {e}"))
}

fn validate_order_confirmation(data: &Value, errors: &mut Invalid) {
    let Some(obj) = data.as_object() else {
        errors.push(FieldError::field("data", "must be an object"));
        return;
    };
    let mut problem = |field: &str, message: &'static str| {
        errors.push(FieldError::at(&["data", field], message));
    };
    match obj.get("order_id") {
        Some(Value::String(s)) if is_valid_message_id(s) => {}
        Some(_) => problem("order_id", "must be 1-128 characters of [A-Za-z0-9._~:-]"),
        None => problem("order_id", "required"),
    }
    match obj.get("ticket_id") {
        Some(Value::String(s)) if is_text(s) => {}
        Some(_) => problem(
            "ticket_id",
            "must be 1-200 characters, no control characters",
        ),
        None => problem("ticket_id", "required"),
    }
    match obj.get("quantity").map(Value::as_u64) {
        Some(Some(1..=100)) => {}
        Some(_) => problem("quantity", "must be a whole number from 1 to 100"),
        None => problem("quantity", "required"),
    }
    for field in [
        "account",
        "ticket_name",
        "reservation_id",
        "valid_from",
        "valid_until",
    ] {
        match obj.get(field) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if is_text(s) => {}
            Some(_) => problem(field, "must be 1-200 characters, no control characters"),
        }
    }
    match obj.get("price_minor") {
        None | Some(Value::Null) => {}
        Some(v) if v.as_i64().is_some_and(|p| (0..=1_000_000_000).contains(&p)) => {}
        Some(_) => problem("price_minor", "must be a whole number from 0 to 1000000000"),
    }
    match obj.get("currency") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s.len() == 3 && s.bytes().all(|b| b.is_ascii_uppercase()) => {}
        Some(_) => problem("currency", "must be three capital letters (ISO 4217)"),
    }
    if obj.get("price_minor").is_some_and(|v| !v.is_null())
        && obj.get("currency").is_none_or(Value::is_null)
    {
        problem("currency", "required with price_minor");
    }
}

fn validate_sold_out(data: &Value, errors: &mut Invalid) {
    let Some(obj) = data.as_object() else {
        errors.push(FieldError::field("data", "must be an object"));
        return;
    };
    for field in ["account", "ticket_id", "ticket_name"] {
        match obj.get(field) {
            Some(Value::String(s)) if is_text(s) => {}
            Some(_) => errors.push(FieldError::at(
                &["data", field],
                "must be 1-200 characters, no control characters",
            )),
            None => errors.push(FieldError::at(&["data", field], "required")),
        }
    }
    match obj.get("capacity").map(Value::as_u64) {
        Some(Some(n)) if u32::try_from(n).is_ok_and(|n| n > 0) => {}
        Some(_) => errors.push(FieldError::at(
            &["data", "capacity"],
            "must be a whole number from 1 to 4294967295",
        )),
        None => errors.push(FieldError::at(&["data", "capacity"], "required")),
    }
}

fn sold_out(p: &SoldOut) -> Rendered {
    Rendered {
        subject: format!("Sold out: {}", p.ticket_name),
        body: format!(
            "Hello,\n\nall {} places of {} ({}) in account {} are taken: new reservations are refused until a hold expires or is released.\n\nchassis tickets\n",
            p.capacity, p.ticket_name, p.ticket_id, p.account
        ),
    }
}

/// Non-empty, at most [`MAX_TEXT`] characters, no control characters.
fn is_text(s: &str) -> bool {
    !s.is_empty() && s.chars().count() <= MAX_TEXT && !s.chars().any(char::is_control)
}

fn order_confirmation(o: &OrderConfirmation) -> Rendered {
    let mut body = String::with_capacity(512);
    body.push_str("Hello,\n\n");
    body.push_str(&format!(
        "thank you for your order {}. Your lift tickets are confirmed.\n\n",
        o.order_id
    ));
    let mut line = |label: &str, value: &str| {
        body.push_str(&format!("  {:<13}{value}\n", format!("{label}:")));
    };
    line("Order", &o.order_id);
    match &o.ticket_name {
        Some(name) => line("Ticket", &format!("{name} ({})", o.ticket_id)),
        None => line("Ticket", &o.ticket_id),
    }
    line("Quantity", &o.quantity.to_string());
    if let (Some(price), Some(currency)) = (o.price_minor, &o.currency) {
        line("Price", &format!("{} {currency} each", money(price)));
        line(
            "Total",
            &format!(
                "{} {currency}",
                money(price.saturating_mul(i64::from(o.quantity)))
            ),
        );
    }
    match (&o.valid_from, &o.valid_until) {
        (Some(from), Some(until)) => line("Valid", &format!("{from} to {until}")),
        (Some(from), None) => line("Valid from", from),
        (None, Some(until)) => line("Valid until", until),
        (None, None) => {}
    }
    if let Some(r) = &o.reservation_id {
        line("Reservation", r);
    }
    if let Some(a) = &o.account {
        line("Account", a);
    }
    body.push_str("\nShow this message at the ticket desk to collect your tickets.\n\n");
    body.push_str("Enjoy the slopes,\nchassis tickets\n");
    Rendered {
        subject: format!("Your lift tickets: order {}", o.order_id),
        body,
    }
}

/// Minor units as `major.minor` with two decimals.
fn money(minor: i64) -> String {
    let sign = if minor < 0 { "-" } else { "" };
    let abs = minor.unsigned_abs();
    format!("{sign}{}.{:02}", abs / 100, abs % 100)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn errors(data: &Value) -> Vec<String> {
        let mut e = Invalid::new();
        validate(ORDER_CONFIRMATION, data, &mut e);
        e.errors()
            .iter()
            .map(|e| e.pointer().trim_start_matches("#/").replace('/', "."))
            .collect()
    }

    #[test]
    fn order_confirmations_need_their_members() {
        assert!(
            errors(&json!({"order_id": "ord_1", "ticket_id": "tkt_1", "quantity": 2})).is_empty()
        );
        assert_eq!(errors(&json!([])), ["data"]);
        assert_eq!(
            errors(&json!({})),
            ["data.order_id", "data.ticket_id", "data.quantity"]
        );
        assert_eq!(
            errors(&json!({
                "order_id": "ord 1", "ticket_id": "", "quantity": 0,
                "account": 7, "ticket_name": "a\u{7}b", "price_minor": -1, "currency": "eur"
            })),
            [
                "data.order_id",
                "data.ticket_id",
                "data.quantity",
                "data.account",
                "data.ticket_name",
                "data.price_minor",
                "data.currency"
            ]
        );
        assert_eq!(
            errors(&json!({"order_id": "o", "ticket_id": "t", "quantity": 1, "price_minor": 100})),
            ["data.currency"]
        );
    }

    #[test]
    fn an_order_confirmation_shows_the_order() {
        let r = render(
            ORDER_CONFIRMATION,
            &json!({
                "order_id": "ord_1", "ticket_id": "tkt_1", "quantity": 3,
                "ticket_name": "Day pass", "price_minor": 4550, "currency": "EUR",
                "valid_from": "2026-12-01", "valid_until": "2027-04-30",
                "reservation_id": "rsv_1", "account": "acme", "extra": true
            }),
        )
        .unwrap();
        assert_eq!(r.subject, "Your lift tickets: order ord_1");
        for text in [
            "Order:       ord_1",
            "Ticket:      Day pass (tkt_1)",
            "Quantity:    3",
            "Price:       45.50 EUR each",
            "Total:       136.50 EUR",
            "Valid:       2026-12-01 to 2027-04-30",
            "Reservation: rsv_1",
            "Account:     acme",
        ] {
            assert!(r.body.contains(text), "{text} missing from\n{}", r.body);
        }
        assert!(render("newsletter", &json!({})).is_err());
        assert!(render(ORDER_CONFIRMATION, &json!({"order_id": "o"})).is_err());
    }

    #[test]
    fn money_has_two_decimals() {
        assert_eq!(money(0), "0.00");
        assert_eq!(money(5), "0.05");
        assert_eq!(money(123_456), "1234.56");
        assert_eq!(money(-250), "-2.50");
    }

    #[test]
    fn sold_out_notices_need_every_member_and_name_the_product() {
        let mut e = Invalid::new();
        validate(SOLD_OUT, &json!({"ticket_name": "", "capacity": 0}), &mut e);
        let pointers: Vec<&str> = e.errors().iter().map(|e| e.pointer()).collect();
        assert_eq!(
            pointers,
            [
                "#/data/account",
                "#/data/ticket_id",
                "#/data/ticket_name",
                "#/data/capacity"
            ]
        );
        let r = render(
            SOLD_OUT,
            &json!({"account": "acme", "ticket_id": "tkt_1", "ticket_name": "Day pass", "capacity": 40}),
        )
        .unwrap();
        assert_eq!(r.subject, "Sold out: Day pass");
        assert!(
            r.body
                .contains("all 40 places of Day pass (tkt_1) in account acme"),
            "{}",
            r.body
        );
        assert!(render(SOLD_OUT, &json!({"account": "acme"})).is_err());
    }
}
