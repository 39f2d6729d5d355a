//! The calls a downstream made, kept for a contract test (feature
//! `contract`; see [`crate::testing::contract`]).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex, PoisonError},
};

use bytes::Bytes;
use http::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Keeps every call made through the [`Downstream`](super::Downstream)s
/// given to [`Downstream::record_into`](super::Downstream::record_into):
/// the method, the path template the driver client wrote (the template
/// given to [`Calls::path`](super::Calls::path), `{}` for each id), the
/// path as sent, the JSON request body, and the final answer's status and
/// JSON body (after retries). Cheap to clone; clones share the log.
///
/// It also finds which fields of an answer the client reads: when the
/// client reads a 2xx answer as a type `T`
/// ([`ClientResponse::json`](super::ClientResponse::json)), each field of
/// the body is tried with a value of another type (a field `T` reads then
/// fails to parse; one it ignores does not) and left out (a field `T`
/// cannot do without then fails). These are the call's
/// [`reads`](RecordedCall::reads) and [`requires`](RecordedCall::requires):
/// what the consumer's code relies on, found from the code itself.
///
/// Made for contract tests: a consumer's test records its calls to the
/// real provider and writes them down as its
/// [`Contract`](crate::testing::contract::Contract).
///
/// ```
/// use chassis::client::{Downstream, Recorder};
///
/// let recorder = Recorder::new();
/// let ticketing = Downstream::builder("ticketing", "http://127.0.0.1:8082").build().unwrap();
/// assert!(ticketing.record_into(&recorder));
/// assert!(recorder.calls().is_empty());
/// ```
#[derive(Debug, Clone, Default)]
pub struct Recorder {
    log: Arc<Mutex<Log>>,
}

#[derive(Debug, Default)]
struct Log {
    /// Path as built → the template it was built from.
    templates: HashMap<String, String>,
    calls: Vec<RecordedCall>,
}

/// One call as a [`Recorder`] kept it.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedCall {
    /// The downstream's name.
    pub downstream: String,
    /// `GET`, `POST`, ...
    pub method: String,
    /// The path template (`/ticketing/v1/{}/reservations`): the one the
    /// client built the path from, or the path itself when it was written
    /// whole; never with a query.
    pub template: String,
    /// The path and query as sent, below the base URL.
    pub path: String,
    /// The request body, when it was JSON.
    pub request: Option<Value>,
    /// The status of the final answer.
    pub status: u16,
    /// The answer's body, when it was JSON.
    pub response: Option<Value>,
    /// The fields of the answer the client reads (dotted, `[]` for the
    /// elements of a list), with their JSON types: empty when the client
    /// did not read the body as a type.
    pub reads: BTreeMap<String, String>,
    /// Those of [`reads`](Self::reads) it cannot do without.
    pub requires: BTreeSet<String>,
}

// === impl Recorder ===

impl Recorder {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// The calls recorded so far, oldest first.
    pub fn calls(&self) -> Vec<RecordedCall> {
        self.lock().calls.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `other` shares this one's log.
    pub(crate) fn same(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.log, &other.log)
    }

    /// Notes that `path` was built from `template`.
    pub(crate) fn template(&self, path: &str, template: &str) {
        self.lock()
            .templates
            .insert(path.to_owned(), template.to_owned());
    }

    /// Keeps one finished call; returns its index.
    pub(crate) fn record(
        &self,
        downstream: &str,
        method: &Method,
        path: &str,
        request: &Bytes,
        status: StatusCode,
        response: &Bytes,
    ) -> usize {
        let bare = path.split_once('?').map_or(path, |(p, _)| p);
        let mut log = self.lock();
        let template = log
            .templates
            .get(bare)
            .cloned()
            .unwrap_or_else(|| bare.to_owned());
        log.calls.push(RecordedCall {
            downstream: downstream.to_owned(),
            method: method.as_str().to_owned(),
            template,
            path: path.to_owned(),
            request: serde_json::from_slice(request).ok(),
            status: status.as_u16(),
            response: serde_json::from_slice(response).ok(),
            reads: BTreeMap::new(),
            requires: BTreeSet::new(),
        });
        log.calls.len() - 1
    }

    /// Notes which fields of `body`, the answer of call `index`, `T`
    /// reads and requires (see the type's docs).
    pub(crate) fn probe<T: DeserializeOwned>(&self, index: usize, body: &[u8]) {
        let Ok(value) = serde_json::from_slice::<Value>(body) else {
            return;
        };
        let parses = |v: Value| serde_json::from_value::<T>(v).is_ok();
        let mut reads = BTreeMap::new();
        let mut requires = BTreeSet::new();
        for (field, types) in fields(&value) {
            if field.ends_with("[]") {
                continue;
            }
            let required = !parses(edit(&value, &field, Edit::Remove));
            if required || !parses(edit(&value, &field, Edit::Mistype)) {
                reads.insert(field.clone(), types);
            }
            if required {
                requires.insert(field);
            }
        }
        let mut log = self.lock();
        if let Some(call) = log.calls.get_mut(index) {
            call.reads.extend(reads);
            call.requires.extend(requires);
        }
    }
}

/// Each field of `value` (dotted, `[]` for a list's elements) with its
/// JSON type(s), `|`-separated when it has several.
pub(crate) fn fields(value: &Value) -> BTreeMap<String, String> {
    let mut seen: BTreeMap<String, BTreeSet<&'static str>> = BTreeMap::new();
    walk(value, "", &mut seen);
    seen.into_iter()
        .map(|(k, v)| (k, v.into_iter().collect::<Vec<_>>().join("|")))
        .collect()
}

type Seen = BTreeMap<String, BTreeSet<&'static str>>;

fn walk(value: &Value, at: &str, seen: &mut Seen) {
    fn note(seen: &mut Seen, path: String, v: &Value) {
        seen.entry(path).or_default().insert(type_of(v));
    }
    match value {
        Value::Object(o) => {
            for (k, v) in o {
                let path = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                note(seen, path.clone(), v);
                walk(v, &path, seen);
            }
        }
        Value::Array(items) => {
            let path = format!("{at}[]");
            for v in items {
                note(seen, path.clone(), v);
            }
            for v in items {
                walk(v, &path, seen);
            }
        }
        _ => {}
    }
}

fn type_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// What [`edit`] does to a field.
#[derive(Clone, Copy)]
pub(crate) enum Edit {
    /// Leaves it out.
    Remove,
    /// Gives it a value of another type (`true` for an object, else an
    /// object no type of the chassis' services reads).
    Mistype,
}

/// `value` with the field at `path` (dotted, `[]` for every element of a
/// list) edited.
pub(crate) fn edit(value: &Value, path: &str, how: Edit) -> Value {
    let mut copy = value.clone();
    let segments: Vec<&str> = path.split('.').collect();
    edit_in(&mut copy, &segments, how);
    copy
}

fn edit_in(value: &mut Value, path: &[&str], how: Edit) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    let (key, list) = first
        .strip_suffix("[]")
        .map_or((*first, false), |k| (k, true));
    let Some(object) = value.as_object_mut() else {
        return;
    };
    if rest.is_empty() {
        match how {
            Edit::Remove => {
                object.remove(key);
            }
            Edit::Mistype => {
                if let Some(v) = object.get_mut(key) {
                    *v = if v.is_object() {
                        Value::Bool(true)
                    } else {
                        serde_json::json!({"\u{1}": [true]})
                    };
                }
            }
        }
        return;
    }
    let Some(inner) = object.get_mut(key) else {
        return;
    };
    match (list, inner) {
        (true, Value::Array(items)) => items.iter_mut().for_each(|v| edit_in(v, rest, how)),
        (false, v) => edit_in(v, rest, how),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use serde_json::json;

    use super::*;

    #[test]
    fn fields_name_nested_and_listed_members() {
        let f = fields(
            &json!({"a": 1, "b": {"c": "x"}, "items": [{"id": "1", "n": null}, {"id": "2", "n": 2.5}], "e": []}),
        );
        assert_eq!(f["a"], "integer");
        assert_eq!(f["b"], "object");
        assert_eq!(f["b.c"], "string");
        assert_eq!(f["items"], "array");
        assert_eq!(f["items[]"], "object");
        assert_eq!(f["items[].id"], "string");
        assert_eq!(f["items[].n"], "null|number");
        assert_eq!(f["e"], "array");
        assert!(!f.contains_key("e[]"));
    }

    #[test]
    fn edits_reach_every_element() {
        let v = json!({"items": [{"id": 1, "x": 2}, {"id": 3}], "b": {"c": 1}});
        assert_eq!(
            edit(&v, "items[].id", Edit::Remove),
            json!({"items": [{"x": 2}, {}], "b": {"c": 1}})
        );
        assert_eq!(
            edit(&v, "b", Edit::Mistype),
            json!({"items": [{"id": 1, "x": 2}, {"id": 3}], "b": true})
        );
        assert_eq!(edit(&v, "nope.c", Edit::Remove), v);
    }

    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct Item {
        id: String,
    }

    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct Read {
        id: String,
        note: Option<String>,
        items: Vec<Item>,
    }

    #[test]
    fn a_probe_finds_what_a_type_reads_and_requires() {
        let recorder = Recorder::new();
        let body =
            json!({"id": "a", "note": null, "extra": 1, "items": [{"id": "i", "more": true}]});
        let bytes = Bytes::from(serde_json::to_vec(&body).unwrap());
        let i = recorder.record(
            "d",
            &Method::GET,
            "/d/v1/x?limit=1",
            &Bytes::new(),
            StatusCode::OK,
            &bytes,
        );
        recorder.probe::<Read>(i, &bytes);
        let call = &recorder.calls()[0];
        assert_eq!(call.template, "/d/v1/x");
        let reads: Vec<&str> = call.reads.keys().map(String::as_str).collect();
        assert_eq!(reads, ["id", "items", "items[].id", "note"]);
        let requires: Vec<&str> = call.requires.iter().map(String::as_str).collect();
        assert_eq!(requires, ["id", "items", "items[].id"]);
    }
}
