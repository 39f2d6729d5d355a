//! Input validation: one answer naming every invalid field.
//!
//! # The standard
//!
//! A request body that is well-formed JSON but whose content is not valid
//! is refused with **one** `422 Unprocessable Content` problem
//! (RFC 9457, RFC 9110 §15.5.21) that names **every** invalid field, so a
//! client fixes them all at once instead of one per round trip. Every
//! service answers the same shape:
//!
//! ```json
//! {
//!   "type": "urn:chassis:problem:unprocessable-content",
//!   "title": "Unprocessable Content",
//!   "status": 422,
//!   "detail": "Some fields are not valid; `errors` lists each of them.",
//!   "reason": "invalid_fields",
//!   "errors": [
//!     { "pointer": "#/name", "detail": "must be 1 to 100 characters" },
//!     { "pointer": "#/data/quantity", "detail": "is required" }
//!   ],
//!   "correlation_id": "0190c8e4-…"
//! }
//! ```
//!
//! * **422, never 400, for content.** 400 stays for a request that cannot
//!   be read at all: a body that is not JSON (axum's `Json` extractor
//!   answers that), a header outside its grammar. A body that parses but
//!   breaks a rule of the API is 422, in every service.
//! * **`errors` uses RFC 9457's field pointers**: each entry's `pointer` is
//!   a JSON Pointer (RFC 6901) to the member, written as a URI fragment
//!   (`#/data/quantity`), and its `detail` says what the member must be.
//!   The whole body is `#` (for a body that is not an object).
//! * **Query parameters** are checked the same way, and named as
//!   `{"parameter": "limit", "detail": "…"}` ([`FieldError::parameter`]),
//!   since they have no place in the body to point at; a list's `limit`
//!   and `cursor` are ([`page`](crate::page)).
//! * The details describe the rule, never echo the value, so nothing the
//!   client sent is reflected back, and nothing internal leaks.
//! * The chassis adds the `correlation_id` as for any problem.
//!
//! [`Fields`] reads the members of a JSON object one at a time, each with
//! its own check, and collects every failure; [`Invalid`] is the answer
//! (it is an [`IntoResponse`] and converts into a [`Problem`]).
//! Deserializing straight into a typed struct would stop at the first bad
//! field, which is why the body is read as a [`Value`] first.
//!
//! # Example
//!
//! ```
//! use chassis::validation::{Fields, Invalid, integer, string};
//! use serde_json::json;
//!
//! struct NewLesson { name: String, seats: u32 }
//!
//! fn new_lesson(body: &serde_json::Value) -> Result<NewLesson, Invalid> {
//!     let mut f = Fields::of(body)?;
//!     let name = f.required("name", |v| {
//!         let s = string(v)?;
//!         (1..=100).contains(&s.chars().count()).then(|| s.to_owned())
//!             .ok_or("must be 1 to 100 characters")
//!     });
//!     let seats = f.required("seats", |v| {
//!         u32::try_from(integer(v)?).ok().filter(|n| (1..=30).contains(n))
//!             .ok_or("must be from 1 to 30")
//!     });
//!     f.finish(|| Some(NewLesson { name: name?, seats: seats? }))
//! }
//!
//! assert_eq!(new_lesson(&json!({"name": "Carving", "seats": 8})).ok().map(|l| l.seats), Some(8));
//!
//! let invalid = new_lesson(&json!({"name": "", "seats": 99})).err().unwrap();
//! let pointers: Vec<&str> = invalid.errors().iter().map(|e| e.pointer()).collect();
//! assert_eq!(pointers, ["#/name", "#/seats"]);
//!
//! let problem = chassis::Problem::from(invalid);
//! assert_eq!(problem.status(), 422);
//! assert_eq!(problem.member("errors").unwrap()[1]["detail"], "must be from 1 to 30");
//! ```

use std::{borrow::Cow, fmt::Write as _};

use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde_json::{Map, Value, json};

use crate::problem::Problem;

/// The status of every validation refusal: 422 Unprocessable Content.
pub const STATUS: StatusCode = StatusCode::UNPROCESSABLE_ENTITY;

/// The `reason` member of every validation refusal.
pub const REASON: &str = "invalid_fields";

/// One invalid member: where it is (an RFC 6901 pointer as a URI fragment)
/// and what it must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pointer: String,
    /// The query parameter named, instead of a member of the body.
    parameter: Option<Cow<'static, str>>,
    detail: Cow<'static, str>,
}

// === impl FieldError ===

impl FieldError {
    /// The top-level member `name` (`#/name`) fails its rule, `detail`.
    pub fn field(name: &str, detail: impl Into<Cow<'static, str>>) -> Self {
        Self::at(&[name], detail)
    }

    /// The member at `path` (`["data", "quantity"]` is `#/data/quantity`;
    /// an empty path is the whole body, `#`). `~` and `/` in a segment are
    /// escaped as RFC 6901 says, and characters a URI fragment cannot hold
    /// are percent-encoded.
    pub fn at(path: &[&str], detail: impl Into<Cow<'static, str>>) -> Self {
        let mut pointer = String::from("#");
        for segment in path {
            pointer.push('/');
            for c in segment.chars() {
                match c {
                    '~' => pointer.push_str("~0"),
                    '/' => pointer.push_str("~1"),
                    c if c.is_ascii_alphanumeric() || "-._!$&'()*+,;=:@".contains(c) => {
                        pointer.push(c);
                    }
                    c => {
                        let mut buf = [0; 4];
                        for b in c.encode_utf8(&mut buf).bytes() {
                            let _ = write!(pointer, "%{b:02X}");
                        }
                    }
                }
            }
        }
        Self {
            pointer,
            parameter: None,
            detail: detail.into(),
        }
    }

    /// The query parameter `name` (`?limit=`) fails its rule, `detail`.
    /// Its entry in `errors` names it as `parameter` instead of a
    /// `pointer` into the body: `{"parameter": "limit", "detail": "…"}`.
    pub fn parameter(
        name: impl Into<Cow<'static, str>>,
        detail: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self {
            pointer: String::new(),
            parameter: Some(name.into()),
            detail: detail.into(),
        }
    }

    /// The member, e.g. `#/data/quantity`; empty for a query parameter
    /// (see [`parameter_name`](Self::parameter_name)).
    pub fn pointer(&self) -> &str {
        &self.pointer
    }

    /// The query parameter, for an error made by
    /// [`parameter`](Self::parameter).
    pub fn parameter_name(&self) -> Option<&str> {
        self.parameter.as_deref()
    }

    /// What the member must be.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    fn to_json(&self) -> Value {
        match &self.parameter {
            Some(name) => json!({ "parameter": name, "detail": self.detail }),
            None => json!({ "pointer": self.pointer, "detail": self.detail }),
        }
    }
}

/// Every invalid member of a request: the 422 answer. Build it from
/// [`Fields`], or push [`FieldError`]s yourself; an empty one stands for
/// "the body is invalid" without a member to name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Invalid {
    errors: Vec<FieldError>,
}

// === impl Invalid ===

impl Invalid {
    /// No invalid member yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one invalid member.
    pub fn push(&mut self, error: FieldError) {
        self.errors.push(error);
    }

    /// With one more invalid member.
    #[must_use]
    pub fn with(mut self, error: FieldError) -> Self {
        self.push(error);
        self
    }

    /// The invalid members, in the order they were found.
    pub fn errors(&self) -> &[FieldError] {
        &self.errors
    }

    /// Whether no member was named.
    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    /// `Err(self)` when a member was named, `Ok(())` otherwise.
    ///
    /// # Errors
    ///
    /// `self`, when it names a member.
    pub fn into_result(self) -> Result<(), Self> {
        if self.is_empty() { Ok(()) } else { Err(self) }
    }
}

impl From<FieldError> for Invalid {
    fn from(error: FieldError) -> Self {
        Self {
            errors: vec![error],
        }
    }
}

impl From<Invalid> for Problem {
    fn from(invalid: Invalid) -> Self {
        let detail = if invalid.is_empty() {
            "The request is not valid."
        } else {
            "Some fields are not valid; `errors` lists each of them."
        };
        Problem::new(STATUS)
            .with_detail(detail)
            .with_member("reason", REASON)
            .with_member(
                "errors",
                invalid
                    .errors
                    .iter()
                    .map(FieldError::to_json)
                    .collect::<Vec<_>>(),
            )
    }
}

impl IntoResponse for Invalid {
    fn into_response(self) -> Response {
        Problem::from(self).into_response()
    }
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("invalid fields:")?;
        for e in &self.errors {
            write!(f, " {} {};", e.pointer, e.detail)?;
        }
        Ok(())
    }
}

impl std::error::Error for Invalid {}

/// The members of one JSON object, read one at a time, and every problem
/// found so far. See the [module docs](self).
#[derive(Debug)]
pub struct Fields<'a> {
    object: &'a Map<String, Value>,
    path: Vec<&'a str>,
    invalid: Invalid,
}

// === impl Fields ===

impl<'a> Fields<'a> {
    /// The members of `body`.
    ///
    /// # Errors
    ///
    /// [`Invalid`] naming the whole body (`#`) when it is not an object.
    pub fn of(body: &'a Value) -> Result<Self, Invalid> {
        let object = body
            .as_object()
            .ok_or_else(|| Invalid::from(FieldError::at(&[], "must be a JSON object")))?;
        Ok(Self {
            object,
            path: Vec::new(),
            invalid: Invalid::new(),
        })
    }

    /// The members of the object at `name` within this one, e.g. a `data`
    /// member whose fields have their own rules; problems are recorded
    /// under `#/name/...` when [`merge`](Self::merge)d back. `None` (and a
    /// problem recorded) when it is missing or not an object.
    pub fn object(&mut self, name: &'a str) -> Option<Fields<'a>> {
        let object = self.required(name, |v| v.as_object().ok_or("must be an object"))?;
        let mut path = self.path.clone();
        path.push(name);
        Some(Fields {
            object,
            path,
            invalid: Invalid::new(),
        })
    }

    /// Takes over the problems of a nested object's [`Fields`].
    pub fn merge(&mut self, nested: Fields<'_>) {
        self.invalid.errors.extend(nested.invalid.errors);
    }

    /// The member `name` checked by `check`; `None` (and a problem recorded)
    /// when it is missing, `null` (`"is required"`) or refused by `check`
    /// (its message).
    pub fn required<T>(
        &mut self,
        name: &str,
        check: impl FnOnce(&'a Value) -> Result<T, &'static str>,
    ) -> Option<T> {
        let result = match self.object.get(name) {
            None | Some(Value::Null) => Err("is required"),
            Some(value) => check(value),
        };
        result.map_err(|detail| self.error(name, detail)).ok()
    }

    /// The member `name` when present and not `null`, checked by `check`:
    /// `Some(None)` when absent, `None` (and a problem recorded) when
    /// refused.
    pub fn optional<T>(
        &mut self,
        name: &str,
        check: impl FnOnce(&'a Value) -> Result<T, &'static str>,
    ) -> Option<Option<T>> {
        match self.object.get(name) {
            None | Some(Value::Null) => Some(None),
            Some(value) => check(value)
                .map(Some)
                .map_err(|detail| self.error(name, detail))
                .ok(),
        }
    }

    /// The raw member `name`, unchecked (`None` when absent).
    pub fn get(&self, name: &str) -> Option<&'a Value> {
        self.object.get(name)
    }

    /// Records that member `name` breaks a rule, e.g. one that spans two
    /// members (`valid_until` before `valid_from`).
    pub fn error(&mut self, name: &str, detail: impl Into<Cow<'static, str>>) {
        let mut path = self.path.clone();
        path.push(name);
        self.invalid.push(FieldError::at(&path, detail));
    }

    /// Whether no problem was found so far.
    pub fn is_valid(&self) -> bool {
        self.invalid.is_empty()
    }

    /// Every problem found, or the value `build` makes from the members
    /// read (all of them `Some` when no problem was found).
    ///
    /// # Errors
    ///
    /// [`Invalid`] naming every member that broke a rule.
    pub fn finish<T>(self, build: impl FnOnce() -> Option<T>) -> Result<T, Invalid> {
        self.invalid.into_result()?;
        build().ok_or_else(Invalid::new)
    }
}

/// The value as a string, or `"must be a string"`.
///
/// # Errors
///
/// When it is not a JSON string.
pub fn string(value: &Value) -> Result<&str, &'static str> {
    value.as_str().ok_or("must be a string")
}

/// The value as a whole number, or `"must be a whole number"`.
///
/// A number with a zero fraction (`3.0`, `1e2`) is a whole number, as JSON
/// Schema's `integer` says: a client that writes every number as a float
/// is not refused for it.
///
/// # Errors
///
/// When it is not a JSON number with a zero fraction that fits an `i64`.
pub fn integer(value: &Value) -> Result<i64, &'static str> {
    value
        .as_i64()
        .or_else(|| {
            // 2^63 is exact as an f64; within the range, the cast is exact.
            let f = value.as_f64()?;
            let bound = 2f64.powi(63);
            #[allow(clippy::cast_possible_truncation)]
            (f.fract() == 0.0 && (-bound..bound).contains(&f)).then_some(f as i64)
        })
        .ok_or("must be a whole number")
}

/// The value as a boolean, or `"must be true or false"`.
///
/// # Errors
///
/// When it is not a JSON boolean.
pub fn boolean(value: &Value) -> Result<bool, &'static str> {
    value.as_bool().ok_or("must be true or false")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_whole_number_may_be_written_as_a_float() {
        assert_eq!(integer(&json!(184.0)), Ok(184));
        assert_eq!(integer(&json!(-3)), Ok(-3));
        assert_eq!(integer(&json!(1.5)), Err("must be a whole number"));
        assert_eq!(integer(&json!(1e300)), Err("must be a whole number"));
        assert_eq!(integer(&json!("1")), Err("must be a whole number"));
    }

    #[test]
    fn every_problem_is_collected_in_order() {
        let body = json!({"a": 1, "b": "x", "c": null, "data": {"q": -1}});
        let mut f = Fields::of(&body).unwrap();
        assert_eq!(f.required("a", integer), Some(1));
        assert_eq!(f.required("b", integer), None);
        assert_eq!(f.required("c", string), None);
        assert_eq!(f.optional("missing", string), Some(None));
        assert_eq!(f.optional("b", string), Some(Some("x")));
        let mut data = f.object("data").unwrap();
        assert_eq!(
            data.required("q", |v| (integer(v)? > 0)
                .then_some(())
                .ok_or("must be positive")),
            None
        );
        f.merge(data);
        f.error("b", "must not be before a");
        let invalid = f.finish(|| Some(())).unwrap_err();
        let got: Vec<(&str, &str)> = invalid
            .errors()
            .iter()
            .map(|e| (e.pointer(), e.detail()))
            .collect();
        assert_eq!(
            got,
            [
                ("#/b", "must be a whole number"),
                ("#/c", "is required"),
                ("#/data/q", "must be positive"),
                ("#/b", "must not be before a"),
            ]
        );
    }

    #[test]
    fn a_body_that_is_not_an_object_is_named_whole() {
        for body in [json!([1]), json!("x"), json!(3)] {
            let invalid = Fields::of(&body).unwrap_err();
            assert_eq!(invalid.errors()[0].pointer(), "#");
        }
    }

    #[test]
    fn pointers_escape_as_rfc_6901_and_3986_say() {
        assert_eq!(
            FieldError::at(&["a/b", "m~n"], "x").pointer(),
            "#/a~1b/m~0n"
        );
        assert_eq!(
            FieldError::at(&["a b", "é"], "x").pointer(),
            "#/a%20b/%C3%A9"
        );
        assert_eq!(FieldError::at(&[], "x").pointer(), "#");
        let p = FieldError::parameter("limit", "x");
        assert_eq!((p.pointer(), p.parameter_name()), ("", Some("limit")));
        assert_eq!(FieldError::field("a", "x").parameter_name(), None);
        assert_eq!(p.to_json(), json!({"parameter": "limit", "detail": "x"}));
        assert_eq!(FieldError::field("", "x").pointer(), "#/");
    }

    #[test]
    fn the_answer_is_one_422_problem() {
        let problem = Problem::from(
            Invalid::new()
                .with(FieldError::field("name", "is required"))
                .with(FieldError::field("seats", "must be from 1 to 30")),
        );
        assert_eq!(problem.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(problem.member("reason"), Some(&json!("invalid_fields")));
        assert_eq!(
            problem.member("errors"),
            Some(&json!([
                {"pointer": "#/name", "detail": "is required"},
                {"pointer": "#/seats", "detail": "must be from 1 to 30"},
            ]))
        );
        let missing = Fields::of(&json!({})).unwrap().finish(|| None::<()>);
        assert_eq!(missing, Err(Invalid::new()));
        assert_eq!(Invalid::new().into_result(), Ok(()));
    }
}
