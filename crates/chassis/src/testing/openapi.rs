//! A service's OpenAPI document as a client reads it, and the check that
//! it documents every route of the service's table.

use http_body_util::BodyExt;
use serde_json::Value;

/// The variable naming a directory where [`fetch_openapi`] also writes
/// each document it reads, for a validator to check (`.ci/run` does): the
/// current version's as `<service>.json`, an older version's (served
/// beside it) as `<service>-v<N>.json`.
pub const OPENAPI_DIR_VAR: &str = "CHASSIS_OPENAPI_DIR";

/// One route as its service's document must show it.
#[derive(Debug, Clone, Copy)]
pub struct Documented {
    /// `GET`, `POST`, ...
    pub method: &'static str,
    /// The full path template, e.g. `/orders/v1/{account}/orders`.
    pub path: &'static str,
    /// Its `x-permission`: the template, or `public`.
    pub permission: &'static str,
    /// Its success status.
    pub status: u16,
    /// The name of the schema its success body refers to
    /// (`#/components/schemas/<name>`), or `""` for an answer without one
    /// or with a schema written in place.
    pub schema: &'static str,
}

/// Reads `GET <base>/<service>/v<version>/openapi.json` over a real
/// connection, without a token, and checks that it is served as JSON; when
/// [`OPENAPI_DIR_VAR`] is set, writes it there too (as `<service>.json`
/// when `version` is the current one that `/info` names, else as
/// `<service>-v<version>.json`).
///
/// # Panics
///
/// If the request fails, the answer is not 200 JSON, or the file cannot be
/// written.
pub async fn fetch_openapi(base: &str, service: &str, version: u32) -> Value {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let url = format!("{base}/{service}/v{version}/openapi.json");
    let res = client
        .get(url.parse().expect("a valid URL"))
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert_eq!(res.status(), 200, "GET {url}");
    assert_eq!(
        res.headers()[http::header::CONTENT_TYPE],
        "application/json",
        "GET {url}"
    );
    let body = res
        .into_body()
        .collect()
        .await
        .expect("the body")
        .to_bytes();
    if let Some(dir) = std::env::var_os(OPENAPI_DIR_VAR) {
        let info = client
            .get(format!("{base}/info").parse().expect("a valid URL"))
            .await
            .unwrap_or_else(|e| panic!("GET {base}/info: {e}"));
        let info: Value =
            serde_json::from_slice(&info.into_body().collect().await.expect("/info").to_bytes())
                .expect("/info is JSON");
        let name = if info["api_version"] == version {
            format!("{service}.json")
        } else {
            format!("{service}-v{version}.json")
        };
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir).expect("the documents' directory");
        std::fs::write(dir.join(name), &body).expect("the document written");
    }
    serde_json::from_slice(&body).expect("the document is JSON")
}

/// Checks that `document` has exactly the operations of `routes` (none
/// missing, none more), each with its `x-permission` (and the permission in
/// its description), the bearer scheme unless public, and its success
/// answer with its schema.
///
/// # Panics
///
/// Naming every route that is not as expected.
pub fn assert_documents(document: &Value, routes: &[Documented]) {
    let mut problems = Vec::new();
    assert_eq!(document["openapi"], "3.1.0", "an OpenAPI 3.1 document");
    let empty = serde_json::Map::new();
    let paths = document["paths"].as_object().unwrap_or(&empty);
    let mut seen = 0;
    for (path, item) in paths {
        for method in item.as_object().unwrap_or(&empty).keys() {
            if routes
                .iter()
                .any(|r| r.path == path && r.method.eq_ignore_ascii_case(method))
            {
                seen += 1;
            } else if !["parameters", "summary", "description", "servers"].contains(&&**method) {
                problems.push(format!(
                    "{} {path}: documented, but not in the expected table",
                    method.to_uppercase()
                ));
            }
        }
    }
    for r in routes {
        let name = format!("{} {}", r.method, r.path);
        let op = &paths
            .get(r.path)
            .map_or(&Value::Null, |p| &p[r.method.to_ascii_lowercase()]);
        if op.is_null() {
            problems.push(format!("{name}: missing from the document"));
            continue;
        }
        if op["x-permission"] != r.permission {
            problems.push(format!(
                "{name}: x-permission is {}, expected `{}`",
                op["x-permission"], r.permission
            ));
        }
        if !op["description"]
            .as_str()
            .is_some_and(|d| d.contains(r.permission) || r.permission == "public")
        {
            problems.push(format!(
                "{name}: the description does not name the permission"
            ));
        }
        let secured = op["security"][0].get("bearer").is_some();
        if secured == (r.permission == "public") {
            problems.push(format!(
                "{name}: bearer security {secured}, permission {}",
                r.permission
            ));
        }
        let success = &op["responses"][r.status.to_string()];
        if success.is_null() {
            problems.push(format!("{name}: no {} answer", r.status));
            continue;
        }
        if !r.schema.is_empty() {
            let expected = format!("#/components/schemas/{}", r.schema);
            let refers = success["content"]
                .as_object()
                .is_some_and(|c| c.values().any(|m| m["schema"]["$ref"] == *expected));
            if !refers {
                problems.push(format!(
                    "{name}: the {} answer does not refer to {expected}: {success}",
                    r.status
                ));
            }
            if document["components"]["schemas"][r.schema].is_null() {
                problems.push(format!(
                    "{name}: no schema `{}` in the components",
                    r.schema
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "the document:\n  {}",
        problems.join("\n  ")
    );
    assert_eq!(
        seen,
        routes.len(),
        "every expected route is documented once"
    );
}
