//! Tests of the route table and the guard's permission cache.

use super::{
    guard::{Access, fill},
    *,
};

#[test]
fn filled_permissions_are_remembered_per_template_and_account() {
    // More templates than the thread keeps: slots are shared, and every
    // answer must still be its own template's.
    let templates: Vec<Arc<Access>> = (0..64)
        .map(|i| {
            Arc::new(Access::Permission(
                format!("svc:{{account}}:op{i}:thing").parse().unwrap(),
            ))
        })
        .collect();
    let fill_for = |access: &Arc<Access>, account: &'static str| {
        let Access::Permission(t) = &**access else {
            unreachable!()
        };
        fill(access, t, |name| (name == "account").then_some(account))
    };
    for account in ["a1", "a2", "a1"] {
        for round in 0..3 {
            for (i, access) in templates.iter().enumerate() {
                let (permission, acc) = fill_for(access, account).unwrap();
                assert_eq!(
                    permission.to_string(),
                    format!("svc:{account}:op{i}:thing"),
                    "round {round}"
                );
                assert_eq!(acc.unwrap().as_str(), account);
                // A value outside the grammar is refused right after.
                assert_eq!(fill_for(access, "bad:").unwrap_err(), "account");
            }
        }
    }
    // Other placeholders are filled afresh every time.
    let other = Arc::new(Access::Permission(
        "svc:{account}:view:{kind}".parse().unwrap(),
    ));
    for kind in ["a", "b", "a"] {
        let Access::Permission(t) = &*other else {
            unreachable!()
        };
        let (p, _) = fill(&other, t, |name| match name {
            "account" => Some("a1"),
            _ => Some(kind),
        })
        .unwrap();
        assert_eq!(p.to_string(), format!("svc:a1:view:{kind}"));
    }
}

async fn ok() -> &'static str {
    "ok"
}

#[test]
fn undeclared_routes_fail_the_build_by_name() {
    let api = Api::new()
        .route(get("/{account}/tickets", ok).requires("ticketing:{account}:view:ticket"))
        .route(post("/{account}/tickets", ok))
        .route(get("/status", ok).public())
        .route(get("/{id}/things", ok).requires("ticketing:{account}:view:thing"))
        .route(get("/bad", ok).requires("ticketing:*:view:ticket"))
        .route(get("/status", ok).public());
    let problems = api.build("/ticketing/v1", None).unwrap_err();
    let text = problems.join("\n");
    assert!(
        text.contains("POST /ticketing/v1/{account}/tickets: declares neither"),
        "{text}"
    );
    assert!(
        text.contains("GET /ticketing/v1/{id}/things: placeholder `{account}`"),
        "{text}"
    );
    assert!(
        text.contains("GET /ticketing/v1/bad: invalid permission"),
        "{text}"
    );
    assert!(
        text.contains("GET /ticketing/v1/status: declared twice"),
        "{text}"
    );
    #[cfg(feature = "jwt")]
    assert!(text.contains("no token verifier is configured"), "{text}");
    #[cfg(not(feature = "jwt"))]
    assert!(
        text.contains(
            "GET /ticketing/v1/{account}/tickets: requires `ticketing:{account}:view:ticket` but this build of the chassis cannot verify tokens: enable the `jwt` feature"
        ),
        "{text}"
    );
}

#[test]
fn public_only_apis_need_no_verifier() {
    let api = Api::new().route(get("/status", ok).public().response::<String>(200));
    assert!(api.build("/x/v1", None).is_ok());
}

#[test]
fn path_params_are_found() {
    let p = path_params("/{account}/tickets/{id}/{*rest}");
    assert!(p.contains("account") && p.contains("id") && p.contains("rest"));
}

#[test]
fn undocumented_routes_fail_the_build_all_at_once() {
    let api = Api::new()
        .route(get("/a", ok).public())
        .route(get("/b", ok).public().summary("only a summary"))
        .route(
            get("/c", ok)
                .public()
                .response_as::<String>(200, "text/plain"),
        )
        .route(
            get("/d", ok)
                .public()
                .undocumented("a probe for the load balancer"),
        )
        .route(
            get("/e/{id}", ok)
                .public()
                .param("name", "not in the path")
                .response_empty(204, "done")
                .response_empty(204, "twice"),
        )
        .route(
            get("/openapi.json", ok)
                .public()
                .response_empty(204, "mine"),
        );
    let problems = api.build("/x/v1", None).unwrap_err();
    let text = problems.join("\n");
    for route in ["GET /x/v1/a", "GET /x/v1/b"] {
        assert!(
            text.contains(&format!("{route}: documents no success answer")),
            "{text}"
        );
    }
    assert!(
        text.contains("GET /x/v1/e/{id}: describes `{name}`, which is not a path parameter"),
        "{text}"
    );
    assert!(
        text.contains("GET /x/v1/e/{id}: response 204 is documented twice"),
        "{text}"
    );
    assert!(
        text.contains("GET /x/v1/openapi.json: the path is the service's OpenAPI document"),
        "{text}"
    );
    assert!(!text.contains("/x/v1/c"), "{text}");
    assert!(!text.contains("/x/v1/d:"), "{text}");
    assert_eq!(problems.len(), 5, "{text}");
}

async fn list() -> &'static str {
    "[]"
}

#[test]
fn operation_ids_are_the_handlers_names_and_unique() {
    let api = Api::new()
        .route(get("/a", list).public().response::<String>(200))
        .route(get("/b", list).public().response::<String>(200))
        .route(get("/c", || async { "c" }).public().response::<String>(200));
    let (_, doc) = api.build("/x/v1", None).unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&doc.render("x", 1, "", None)).unwrap();
    // One handler for two routes: each is named by its method and path.
    assert_eq!(doc["paths"]["/x/v1/a"]["get"]["operationId"], "get_a");
    assert_eq!(doc["paths"]["/x/v1/b"]["get"]["operationId"], "get_b");
    assert_eq!(doc["info"]["version"], "unversioned");
    let problems = Api::new()
        .route(get("/a", list).public().response::<String>(200))
        .route(
            get("/b", ok)
                .public()
                .operation_id("list")
                .response::<String>(200),
        )
        .build("/x/v1", None)
        .unwrap_err();
    assert_eq!(
        problems,
        [
            "GET /x/v1/b: operation id `list` is also GET /x/v1/a's; name one with `.operation_id(..)`"
        ]
    );
    let api = Api::new()
        .route(get("/a", list).public().response::<String>(200))
        .route(
            get("/b", ok)
                .public()
                .operation_id("list_b")
                .response::<String>(200),
        )
        .route(
            get("/c/{*rest}", || async { "c" })
                .public()
                .response::<String>(200),
        );
    let (_, doc) = api.build("/x/v1", None).unwrap();
    let doc: serde_json::Value =
        serde_json::from_slice(&doc.render("x", 1, "1.2.3", None)).unwrap();
    assert_eq!(doc["paths"]["/x/v1/a"]["get"]["operationId"], "list");
    assert_eq!(doc["paths"]["/x/v1/b"]["get"]["operationId"], "list_b");
    // A closure has no name: its method and path; a catch-all is a plain
    // parameter in the document.
    assert_eq!(
        doc["paths"]["/x/v1/c/{rest}"]["get"]["operationId"],
        "get_c_rest"
    );
    assert_eq!(doc["info"]["version"], "1.2.3");
    assert_eq!(doc["openapi"], "3.1.0");
}
