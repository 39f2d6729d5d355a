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
    let api = Api::new().route(get("/status", ok).public());
    assert!(api.build("/x/v1", None).is_ok());
}

#[test]
fn path_params_are_found() {
    let p = path_params("/{account}/tickets/{id}/{*rest}");
    assert!(p.contains("account") && p.contains("id") && p.contains("rest"));
}
