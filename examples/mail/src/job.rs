//! Validation of an incoming mail job.

use chassis::{
    correlation::CorrelationId,
    validation::{FieldError, Invalid},
};
use lettre::Address;
use serde_json::Value;

use crate::{
    client::{TEMPLATES, is_valid_message_id},
    format::parse_address,
};

/// Largest `data`, serialized.
pub(crate) const MAX_DATA_BYTES: usize = 16 * 1024;

/// A job that passed validation.
#[derive(Debug, Clone)]
pub(crate) struct ValidJob {
    pub(crate) message_id: String,
    pub(crate) to: Address,
    pub(crate) template: String,
    /// An object.
    pub(crate) data: Value,
    /// The job's correlation id, when it has a valid one.
    pub(crate) correlation_id: Option<CorrelationId>,
    /// Whether the job had a `correlation_id` that was not valid (and so
    /// is replaced by the request's).
    pub(crate) correlation_id_rejected: bool,
}

/// Checks every member of `body`, reporting all the invalid ones.
pub(crate) fn validate(body: &Value) -> Result<ValidJob, Invalid> {
    let Some(obj) = body.as_object() else {
        return Err(FieldError::at(&[], "must be a JSON object").into());
    };
    let mut errors = Invalid::new();
    let text = |name: &str| obj.get(name).and_then(Value::as_str);

    let message_id = match obj.get("message_id") {
        None => {
            errors.push(FieldError::field("message_id", "required"));
            None
        }
        Some(Value::String(id)) if is_valid_message_id(id) => Some(id.clone()),
        Some(_) => {
            errors.push(FieldError::field(
                "message_id",
                "must be 1-128 characters of [A-Za-z0-9._~:-]",
            ));
            None
        }
    };
    let to = match obj.get("to") {
        None => {
            errors.push(FieldError::field("to", "required"));
            None
        }
        Some(v) => match v.as_str().map(parse_address) {
            Some(Ok(address)) => Some(address),
            Some(Err(why)) => {
                errors.push(FieldError::field("to", why));
                None
            }
            None => {
                errors.push(FieldError::field("to", "must be a string"));
                None
            }
        },
    };
    let template = match (obj.get("template"), text("template")) {
        (None, _) => {
            errors.push(FieldError::field("template", "required"));
            None
        }
        (_, Some(t)) if TEMPLATES.contains(&t) => Some(t.to_owned()),
        _ => {
            errors.push(FieldError::field(
                "template",
                format!("must be one of: {}", TEMPLATES.join(", ")),
            ));
            None
        }
    };
    let data = match obj.get("data") {
        None | Some(Value::Null) => Value::Object(serde_json::Map::new()),
        Some(v) => v.clone(),
    };
    if !data.is_object() {
        errors.push(FieldError::field("data", "must be an object"));
    } else if serde_json::to_vec(&data).map_or(usize::MAX, |b| b.len()) > MAX_DATA_BYTES {
        errors.push(FieldError::field("data", "must be at most 16384 bytes"));
    } else if let Some(t) = &template {
        crate::template::validate(t, &data, &mut errors);
    }
    let (correlation_id, correlation_id_rejected) = match obj.get("correlation_id") {
        None | Some(Value::Null) => (None, false),
        Some(v) => match v.as_str().and_then(CorrelationId::parse) {
            Some(id) => (Some(id), false),
            None => (None, true),
        },
    };

    match (message_id, to, template) {
        (Some(message_id), Some(to), Some(template)) if errors.is_empty() => Ok(ValidJob {
            message_id,
            to,
            template,
            data,
            correlation_id,
            correlation_id_rejected,
        }),
        _ => Err(errors),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn fields(body: &Value) -> Vec<String> {
        validate(body)
            .err()
            .unwrap_or_default()
            .errors()
            .iter()
            .map(|e| e.pointer().trim_start_matches("#/").replace('/', "."))
            .collect()
    }

    fn good() -> Value {
        json!({
            "message_id": "evt-1",
            "to": "alice@example.com",
            "template": "order_confirmation",
            "data": {"order_id": "ord_1", "ticket_id": "tkt_1", "quantity": 1},
            "correlation_id": "corr-1"
        })
    }

    #[test]
    fn a_good_job_passes() {
        let job = validate(&good()).unwrap();
        assert_eq!(job.message_id, "evt-1");
        assert_eq!(job.to.to_string(), "alice@example.com");
        assert_eq!(job.correlation_id.unwrap().as_str(), "corr-1");
        assert!(!job.correlation_id_rejected);
    }

    #[test]
    fn every_invalid_member_is_listed() {
        assert_eq!(fields(&json!("x")), ["#"]);
        assert_eq!(fields(&json!({})), ["message_id", "to", "template"]);
        assert_eq!(
            fields(
                &json!({"message_id": "a b", "to": "nobody", "template": "newsletter", "data": 3})
            ),
            ["message_id", "to", "template", "data"]
        );
        let mut body = good();
        body["data"]["quantity"] = json!(0);
        body["to"] = json!(7);
        assert_eq!(fields(&body), ["to", "data.quantity"]);
        let mut body = good();
        body["data"]["ticket_name"] = json!("x".repeat(MAX_DATA_BYTES));
        assert_eq!(fields(&body), ["data"]);
    }

    #[test]
    fn a_bad_correlation_id_is_replaced_not_refused() {
        let mut body = good();
        body["correlation_id"] = json!("bad id\n");
        let job = validate(&body).unwrap();
        assert!(job.correlation_id.is_none());
        assert!(job.correlation_id_rejected);
        body.as_object_mut().unwrap().remove("correlation_id");
        let job = validate(&body).unwrap();
        assert!(job.correlation_id.is_none());
        assert!(!job.correlation_id_rejected);
    }
}
