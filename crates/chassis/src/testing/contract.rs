//! Consumer-driven contracts: what a consumer's driver client relies on,
//! recorded against the real provider, and checked against the provider's
//! published OpenAPI document.
//!
//! # The standard
//!
//! A service's API is used by other services through its driver client, and
//! a provider must not break a consumer by surprise (Newman, *Building
//! Microservices*, "consumer-driven contracts"). The request and response
//! types are shared Rust types, so a field cannot be renamed on one side
//! only; but the method, the path, the statuses a client handles and the
//! fields it reads are written in the client's code, and the provider may
//! change its routes, statuses and schemas. So:
//!
//! 1. **The consumer writes the contract, by running.** A consumer's test
//!    calls the real provider on loopback (no mocks) through its own
//!    driver client, with the [`Downstream`](crate::client::Downstream)
//!    recording into a [`Recorder`]. [`Contract::from_calls`] turns the
//!    calls into a contract: one interaction per method, path template
//!    and status, with a request example, a response example, the fields
//!    of the request (`sends`), and the fields of the answer the consumer
//!    reads (`reads`, with their JSON types) and cannot do without
//!    (`requires`). Those two are found from the consumer's own code: when
//!    the client parses an answer as its Rust type, each field is tried
//!    left out and with a value of another type, and the type's parse
//!    tells whether it reads the field and whether it requires it (an
//!    `Option` does not; a field the type does not have is not read).
//!    `items[].id` is the `id` of each element of `items`. A contract is a
//!    JSON file per consumer and provider, `<consumer>-<provider>.json`,
//!    committed in a directory of contracts.
//! 2. **The contract says what the code does.**
//!    [`Contract::assert_up_to_date`] fails the consumer's test when the
//!    committed file differs from what was recorded (new or removed
//!    interactions, statuses, fields or types; the example values may
//!    change freely), until it is rewritten with
//!    `CHASSIS_UPDATE_CONTRACTS=1` ([`UPDATE_VAR`]) and the change is
//!    committed, where the provider's owners see it in review.
//! 3. **The provider honours every contract naming it.** The provider's
//!    test runs [`verify_provider`]: it reads its own served OpenAPI
//!    document(s) (one per API version a contract calls) and checks each
//!    interaction of each contract ([`Contract::check`]): the operation
//!    exists (method and path template; parameter names do not matter),
//!    the status is documented, the request example is valid against the
//!    request body's schema, every field the consumer reads still has a
//!    type the schema of that status allows for it (checked on the
//!    response example), and every field it requires is still required.
//!    Changes to fields the consumer does not read break nothing. Schemas
//!    are checked with a JSON Schema 2020-12 validator
//!    (the dialect of OpenAPI 3.1), `$ref`s resolved in the document's
//!    `components`. A provider change that breaks a consumer fails the
//!    provider's build, naming the consumer, the interaction and the field;
//!    a breaking change must then be a new API version (`/v2/`), which
//!    leaves every contract of `/v1/` valid.
//!
//! Each check the consumer's test runs against the live provider too
//! ([`Contract::assert_honoured_by`]), so the responses recorded there,
//! real answers of the real provider, are valid against the provider's
//! document at the time they were recorded.
//!
//! What is not in a contract: headers (the chassis sets the same ones on
//! every call), query strings (pagination is the chassis' own, checked by
//! its tests), the body of a refusal (a client reads it through
//! [`ClientError`](crate::client::ClientError), whose accessors do without
//! any member; the status it handles is in the contract), and fields the
//! consumer never saw (a field that is only sometimes present is recorded
//! when the test makes it appear). As in
//! Pact, a contract is as good as the consumer's test: it records the
//! interactions the test exercises, so the test must exercise every call
//! the consumer makes, its refusals included.
//!
//! # Example
//!
//! A provider's document that no longer requires a field a consumer reads
//! breaks its contract:
//!
//! ```
//! use chassis::client::RecordedCall;
//! use chassis::testing::contract::Contract;
//! use serde_json::json;
//!
//! let calls = [RecordedCall {
//!     downstream: "lessons".into(),
//!     method: "GET".into(),
//!     template: "/lessons/v1/{}/lessons/{}".into(),
//!     path: "/lessons/v1/acme/lessons/lsn_1".into(),
//!     request: None,
//!     status: 200,
//!     response: Some(json!({"id": "lsn_1", "seats": 4})),
//!     reads: [("id".into(), "string".into()), ("seats".into(), "integer".into())].into(),
//!     requires: ["id".into(), "seats".into()].into(),
//! }];
//! let contract = Contract::from_calls("school", "lessons", &calls);
//! assert_eq!(contract.interactions[0].reads["seats"], "integer");
//!
//! let mut document = json!({
//!     "openapi": "3.1.0",
//!     "paths": {"/lessons/v1/{account}/lessons/{id}": {"get": {"responses": {
//!         "200": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Lesson"}}}}
//!     }}}},
//!     "components": {"schemas": {"Lesson": {
//!         "type": "object",
//!         "required": ["id", "seats"],
//!         "properties": {"id": {"type": "string"}, "seats": {"type": "integer"}}
//!     }}}
//! });
//! assert!(contract.check(std::slice::from_ref(&document)).is_empty());
//!
//! document["components"]["schemas"]["Lesson"]["required"] = json!(["id"]);
//! let breaches = contract.check(&[document]);
//! assert_eq!(breaches.len(), 1);
//! assert!(breaches[0].to_string().contains("`seats`"), "{}", breaches[0]);
//! ```

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::client::record::{Edit, edit, fields};
pub use crate::client::{RecordedCall, Recorder};

/// Set to `1` to rewrite the committed contracts that are out of date
/// instead of failing ([`Contract::assert_up_to_date`]).
pub const UPDATE_VAR: &str = "CHASSIS_UPDATE_CONTRACTS";

/// What one consumer relies on in one provider's API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Contract {
    /// The consumer's service name.
    pub consumer: String,
    /// The provider's service name.
    pub provider: String,
    /// One per method, path template and status, in that order.
    pub interactions: Vec<Interaction>,
}

/// One call a consumer makes and one answer it handles.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interaction {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The path template, `{}` for each parameter:
    /// `/ticketing/v1/{}/reservations`.
    pub path: String,
    /// The status of the answer.
    pub status: u16,
    /// An example of the JSON body sent, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<Value>,
    /// The fields of the request body, with their JSON types.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sends: BTreeMap<String, String>,
    /// An example of the JSON answer received, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<Value>,
    /// The fields of the answer the consumer reads, with their JSON types
    /// in the example (`string`, `integer`, `number`, `boolean`, `object`,
    /// `array`, `null`; several joined by `|`); `items[].id` is the `id`
    /// of each element of `items`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub reads: BTreeMap<String, String>,
    /// Those of `reads` the consumer cannot do without.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub requires: BTreeSet<String>,
}

/// One way a provider's document breaks a consumer's contract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breach {
    /// The consumer whose contract is broken.
    pub consumer: String,
    /// The provider.
    pub provider: String,
    /// The interaction: `POST /ticketing/v1/{}/reservations → 201`.
    pub interaction: String,
    /// What is wrong, naming the field when there is one.
    pub problem: String,
}

impl fmt::Display for Breach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} → {}: {}: {}",
            self.consumer, self.provider, self.interaction, self.problem
        )
    }
}

type Shape<'a> = (
    &'a str,
    &'a str,
    u16,
    &'a BTreeMap<String, String>,
    &'a BTreeMap<String, String>,
    &'a BTreeSet<String>,
);

// === impl Interaction ===

impl Interaction {
    fn name(&self) -> String {
        format!("{} {} → {}", self.method, self.path, self.status)
    }

    /// What [`Contract::assert_up_to_date`] compares: all but the examples.
    fn shape(&self) -> Shape<'_> {
        (
            &self.method,
            &self.path,
            self.status,
            &self.sends,
            &self.reads,
            &self.requires,
        )
    }
}

// === impl Contract ===

impl Contract {
    /// The contract of `consumer` with `provider` made of `calls` (those to
    /// the downstream named `provider`; all of them when none is): per
    /// method, path template and status, the call whose answer has the
    /// most fields is kept as the example.
    pub fn from_calls(consumer: &str, provider: &str, calls: &[RecordedCall]) -> Self {
        let mine = calls.iter().any(|c| c.downstream == provider);
        let mut kept: BTreeMap<(String, String, u16), Interaction> = BTreeMap::new();
        for call in calls.iter().filter(|c| !mine || c.downstream == provider) {
            let interaction = Interaction {
                method: call.method.clone(),
                path: call.template.clone(),
                status: call.status,
                sends: call.request.as_ref().map(fields).unwrap_or_default(),
                request: call.request.clone(),
                reads: call.reads.clone(),
                requires: call.requires.clone(),
                response: call.response.clone(),
            };
            let key = (call.template.clone(), call.method.clone(), call.status);
            match kept.get(&key) {
                Some(k) if k.reads.len() >= interaction.reads.len() => {}
                _ => {
                    kept.insert(key, interaction);
                }
            }
        }
        Self {
            consumer: consumer.to_owned(),
            provider: provider.to_owned(),
            interactions: kept.into_values().collect(),
        }
    }

    /// `<consumer>-<provider>.json`.
    pub fn file_name(&self) -> String {
        format!("{}-{}.json", self.consumer, self.provider)
    }

    /// Reads a contract file.
    ///
    /// # Panics
    ///
    /// If it cannot be read or is not a contract (a test helper).
    pub fn load(path: &Path) -> Self {
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("the contract {}: {e}", path.display()));
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("the contract {}: {e}", path.display()))
    }

    /// Every contract in `dir` whose provider is `provider`, by file name.
    ///
    /// # Panics
    ///
    /// If the directory or a contract in it cannot be read.
    pub fn load_for(dir: &Path, provider: &str) -> Vec<Self> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("the contracts' directory {}: {e}", dir.display()))
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        files
            .iter()
            .map(|p| Self::load(p))
            .filter(|c| c.provider == provider)
            .collect()
    }

    /// Checks that the contract committed in `dir` says what was recorded
    /// (examples aside). With [`UPDATE_VAR`] set to `1`, writes it instead
    /// when it is missing or differs.
    ///
    /// # Panics
    ///
    /// When the committed contract is missing or differs and
    /// [`UPDATE_VAR`] is not set, listing the interactions that differ.
    pub fn assert_up_to_date(&self, dir: &Path) {
        let path = dir.join(self.file_name());
        let committed = path
            .exists()
            .then(|| Self::load(&path))
            .filter(|c| c.consumer == self.consumer && c.provider == self.provider);
        let same = committed.as_ref().is_some_and(|c| {
            c.interactions.len() == self.interactions.len()
                && c.interactions
                    .iter()
                    .zip(&self.interactions)
                    .all(|(a, b)| a.shape() == b.shape())
        });
        if same {
            return;
        }
        if std::env::var(UPDATE_VAR).is_ok_and(|v| v == "1") {
            std::fs::create_dir_all(dir).expect("the contracts' directory");
            let mut text = serde_json::to_string_pretty(self).expect("a contract serializes");
            text.push('\n');
            std::fs::write(&path, text)
                .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
            return;
        }
        let Some(committed) = committed else {
            panic!(
                "no contract of {} with {} at {}: run the test with {UPDATE_VAR}=1 and commit it",
                self.consumer,
                self.provider,
                path.display()
            );
        };
        let differences = differences(&committed, self);
        panic!(
            "the contract {} is out of date:\n  {}\nrun the test with {UPDATE_VAR}=1 and commit the change",
            path.display(),
            differences.join("\n  ")
        );
    }

    /// The ways `documents` (the provider's OpenAPI 3.1 documents, one per
    /// API version) break this contract; empty when they honour it.
    pub fn check(&self, documents: &[Value]) -> Vec<Breach> {
        let mut breaches = Vec::new();
        for interaction in &self.interactions {
            let breach = |problem: String| Breach {
                consumer: self.consumer.clone(),
                provider: self.provider.clone(),
                interaction: interaction.name(),
                problem,
            };
            for problem in self.check_one(interaction, documents) {
                breaches.push(breach(problem));
            }
        }
        breaches
    }

    fn check_one(&self, interaction: &Interaction, documents: &[Value]) -> Vec<String> {
        let Some((document, operation)) = operation(documents, interaction) else {
            return vec![format!(
                "the provider's document has no operation {} {}",
                interaction.method, interaction.path
            )];
        };
        let mut problems = Vec::new();
        let consumer = &self.consumer;
        if let Some(example) = &interaction.request {
            match body_schema(&operation["requestBody"]) {
                None => problems.push(format!(
                    "the operation takes no JSON body, but {consumer} sends one"
                )),
                Some(schema) => {
                    for e in violations(document, schema, example) {
                        problems.push(format!("the request {consumer} sends is refused: {e}"));
                    }
                }
            }
        }
        let status = interaction.status.to_string();
        let range = format!("{}XX", interaction.status / 100);
        let responses = &operation["responses"];
        let answer = [&status, &range]
            .into_iter()
            .map(|s| &responses[s.as_str()])
            .find(|r| !r.is_null());
        let Some(answer) = answer else {
            let documented: Vec<&String> = responses
                .as_object()
                .map(|r| r.keys().collect())
                .unwrap_or_default();
            problems.push(format!(
                "status {status}, which {consumer} handles, is not documented (documented: {})",
                documented
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            return problems;
        };
        let Some(example) = &interaction.response else {
            return problems;
        };
        let Some(schema) = body_schema(answer) else {
            problems.push(format!(
                "the {status} answer has no JSON body in the document, but {consumer} reads one"
            ));
            return problems;
        };
        // Only what the consumer reads matters: a change to a field it
        // ignores, or a new required field, breaks nothing.
        let invalid: Vec<(String, String)> = violations_at(document, schema, example)
            .into_iter()
            .filter(|(field, _)| interaction.reads.contains_key(field))
            .collect();
        if !invalid.is_empty() {
            for (field, e) in invalid {
                problems.push(format!(
                    "`{field}`, which {consumer} reads, no longer fits the {status} answer's schema: {e}"
                ));
            }
            return problems;
        }
        for field in &interaction.requires {
            let without = edit(example, field, Edit::Remove);
            if &without != example && violations(document, schema, &without).is_empty() {
                problems.push(format!(
                    "`{field}`, which {consumer} requires, may be left out: the {status} answer's schema does not require it"
                ));
            }
        }
        problems
    }

    /// The breaches, as text, that `change` to one of the provider's
    /// documents would make: for a test that a kind of change is caught,
    /// or to try a planned change against the consumers' contracts.
    ///
    /// ```
    /// # use chassis::testing::contract::Contract;
    /// # let contract = Contract { consumer: "school".into(), provider: "lessons".into(), interactions: vec![] };
    /// # let document = serde_json::json!({"paths": {}});
    /// let found = contract.breaches_if(&document, |d| {
    ///     d["paths"].as_object_mut().unwrap().remove("/lessons/v1/{account}/lessons/{id}");
    /// });
    /// assert!(found.is_empty(), "this consumer does not call it");
    /// ```
    pub fn breaches_if(&self, document: &Value, change: impl FnOnce(&mut Value)) -> Vec<String> {
        let mut changed = document.clone();
        change(&mut changed);
        self.check(&[changed])
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    /// Checks this contract against the documents served by the provider
    /// at `base` (one for each API version the contract calls), as the
    /// consumer's test does with the provider it has just called.
    ///
    /// # Panics
    ///
    /// Listing every breach, or if a document cannot be fetched.
    pub async fn assert_honoured_by(&self, base: &str) {
        let documents = documents(base, &self.provider, std::slice::from_ref(self)).await;
        assert_no_breaches(&self.check(&documents));
    }
}

/// Checks every contract in `dir` naming `provider` against the documents
/// the provider serves at `base` (`GET /<provider>/v<N>/openapi.json` for
/// each version N a contract calls), and returns how many contracts were
/// checked. A provider's test calls it with its service running.
///
/// # Panics
///
/// Listing every breach of every contract, or if a contract or a document
/// cannot be read.
pub async fn verify_provider(base: &str, provider: &str, dir: &Path) -> usize {
    let contracts = Contract::load_for(dir, provider);
    let documents = documents(base, provider, &contracts).await;
    let breaches: Vec<Breach> = contracts.iter().flat_map(|c| c.check(&documents)).collect();
    assert_no_breaches(&breaches);
    contracts.len()
}

fn assert_no_breaches(breaches: &[Breach]) {
    assert!(
        breaches.is_empty(),
        "{} breach(es) of consumers' contracts:\n  {}",
        breaches.len(),
        breaches
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n  ")
    );
}

/// The provider's documents of each version the contracts call.
async fn documents(base: &str, provider: &str, contracts: &[Contract]) -> Vec<Value> {
    let prefix = format!("/{provider}/v");
    let versions: BTreeSet<u32> = contracts
        .iter()
        .flat_map(|c| &c.interactions)
        .filter_map(|i| {
            let rest = i.path.strip_prefix(&prefix)?;
            rest.split('/').next()?.parse().ok()
        })
        .collect();
    let mut documents = Vec::new();
    for version in versions {
        documents.push(super::fetch_openapi(base, provider, version).await);
    }
    documents
}

/// The operation of `interaction` and the document it is in: the path
/// whose template is the interaction's (parameters named anything), else
/// one where a parameter stands for a literal segment of the interaction.
fn operation<'d>(
    documents: &'d [Value],
    interaction: &Interaction,
) -> Option<(&'d Value, &'d Value)> {
    let method = interaction.method.to_ascii_lowercase();
    let wanted: Vec<&str> = interaction.path.split('/').collect();
    let mut fallback = None;
    for document in documents {
        let Some(paths) = document["paths"].as_object() else {
            continue;
        };
        for (template, item) in paths {
            let op = &item[method.as_str()];
            if op.is_null() {
                continue;
            }
            let segments: Vec<&str> = template.split('/').collect();
            if segments.len() != wanted.len() {
                continue;
            }
            let param = |s: &str| s.starts_with('{') && s.ends_with('}');
            let exact = segments
                .iter()
                .zip(&wanted)
                .all(|(d, w)| d == w || (param(d) && *w == "{}"));
            if exact {
                return Some((document, op));
            }
            let loose = segments
                .iter()
                .zip(&wanted)
                .all(|(d, w)| d == w || param(d));
            if loose && fallback.is_none() {
                fallback = Some((document, op));
            }
        }
    }
    fallback
}

/// The schema of a JSON body (request body or answer): its
/// `application/json` content, else any `+json` one.
fn body_schema(body: &Value) -> Option<&Value> {
    let content = body["content"].as_object()?;
    content
        .get("application/json")
        .or_else(|| {
            content
                .iter()
                .find(|(media, _)| media.ends_with("+json"))
                .map(|(_, v)| v)
        })
        .map(|m| &m["schema"])
        .filter(|s| !s.is_null())
}

/// Why `instance` is not valid against `schema` of `document`, one line
/// each (`at /available: ...`); empty when it is.
fn violations(document: &Value, schema: &Value, instance: &Value) -> Vec<String> {
    violations_at(document, schema, instance)
        .into_iter()
        .map(|(_, e)| e)
        .collect()
}

/// [`violations`], each with the field it is at (`items[].id` for
/// `/items/3/id`; `""` for the whole body).
fn violations_at(document: &Value, schema: &Value, instance: &Value) -> Vec<(String, String)> {
    let mut root = match schema {
        Value::Object(o) => o.clone(),
        // `true` / `false` schemas.
        other => {
            let mut m = Map::new();
            m.insert("allOf".to_owned(), Value::Array(vec![other.clone()]));
            m
        }
    };
    root.insert("components".to_owned(), document["components"].clone());
    let validator = match jsonschema::draft202012::new(&Value::Object(root)) {
        Ok(v) => v,
        Err(e) => {
            return vec![(
                String::new(),
                format!("the schema is not valid JSON Schema: {e}"),
            )];
        }
    };
    validator
        .iter_errors(instance)
        .map(|e| {
            let at = e.instance_path().to_string();
            let mut field = String::new();
            for segment in at.split('/').skip(1) {
                if segment.parse::<usize>().is_ok() {
                    field.push_str("[]");
                } else {
                    if !field.is_empty() {
                        field.push('.');
                    }
                    field.push_str(&segment.replace("~1", "/").replace("~0", "~"));
                }
            }
            let message = format!("at {}: {e}", if at.is_empty() { "/" } else { &at });
            (field, message)
        })
        .collect()
}

/// How `new` differs from `old`, one line per interaction.
fn differences(old: &Contract, new: &Contract) -> Vec<String> {
    let key = |i: &Interaction| i.name();
    let olds: BTreeMap<String, &Interaction> =
        old.interactions.iter().map(|i| (key(i), i)).collect();
    let news: BTreeMap<String, &Interaction> =
        new.interactions.iter().map(|i| (key(i), i)).collect();
    let mut lines = Vec::new();
    for (name, i) in &news {
        match olds.get(name) {
            None => lines.push(format!("new: {name}")),
            Some(o) if o.shape() != i.shape() => {
                let change =
                    |what: &str, a: &BTreeMap<String, String>, b: &BTreeMap<String, String>| {
                        let mut out = Vec::new();
                        for (f, t) in b {
                            match a.get(f) {
                                None => out.push(format!("{what} +{f}: {t}")),
                                Some(u) if u != t => out.push(format!("{what} {f}: {u} → {t}")),
                                _ => {}
                            }
                        }
                        out.extend(
                            a.keys()
                                .filter(|f| !b.contains_key(*f))
                                .map(|f| format!("{what} -{f}")),
                        );
                        out
                    };
                let mut all = change("sends", &o.sends, &i.sends);
                all.extend(change("reads", &o.reads, &i.reads));
                let set = |s: &BTreeSet<String>| {
                    s.iter()
                        .map(|f| (f.clone(), String::new()))
                        .collect::<BTreeMap<_, _>>()
                };
                all.extend(change("requires", &set(&o.requires), &set(&i.requires)));
                lines.push(format!("changed: {name}: {}", all.join(", ")));
            }
            Some(_) => {}
        }
    }
    for name in olds.keys().filter(|n| !news.contains_key(*n)) {
        lines.push(format!("gone: {name}"));
    }
    lines
}
