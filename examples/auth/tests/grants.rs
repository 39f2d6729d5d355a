//! Permissions as data: the grants file (applied at start-up and on every
//! change, a bad change refused) and the admin API.

mod support;

use http::{Method, StatusCode};
use support::{
    ALICE_GRANTS, Data, decode, entry, eventually, from_file, send, start, start_with, write_grants,
};

#[tokio::test]
async fn subjects_in_the_grants_file_get_tokens_and_its_changes_reach_their_next_token() {
    let dir = Data::new("grantsfile");
    let file = dir.path().join("grants.toml");
    let keycards_v1 = ["ticketing:*:view:ticket", "auth:ticketing:exchange:token"];
    write_grants(
        &file,
        &(entry("clients", "keycards", &keycards_v1)
            + &entry("users", "carol", &["ticketing:acme:*:*"])),
    );
    let auth = start_with(&dir, from_file(&file)).await;

    // A new service, registered by data alone.
    let claims = auth.client_claims("keycards", "password").await;
    assert_eq!(claims["sub"], "keycards");
    assert_eq!(claims["kind"], "service");
    assert_eq!(claims["perms"], serde_json::json!(keycards_v1));
    let res = auth.login("carol", "password").await;
    assert_eq!(res.status, 200, "{res:?}");
    let refresh = res.json()["refresh_token"].as_str().unwrap().to_owned();
    let (_, carol) = decode(res.json()["access_token"].as_str().unwrap());
    assert_eq!(carol["perms"], serde_json::json!(["ticketing:acme:*:*"]));
    // Only what the file declares: no demo users.
    assert_eq!(auth.login("alice", "alice-password").await.status, 400);

    // A grant removed, two added (one a deny): in the next tokens of the
    // same subjects, without a restart.
    let keycards_v2 = [
        "ticketing:*:view:ticket",
        "!ticketing:vip:view:ticket",
        "mail::send:message",
    ];
    let carol_v2 = ["ticketing:acme:*:*", "orders:acme:*:*"];
    write_grants(
        &file,
        &(entry("clients", "keycards", &keycards_v2) + &entry("users", "carol", &carol_v2)),
    );
    eventually("keycards' new grants", || async {
        auth.client_claims("keycards", "password").await["perms"] == serde_json::json!(keycards_v2)
    })
    .await;
    // Carol's login survives the change, and its next token has her new
    // grants.
    let res = auth.refresh(&refresh).await;
    assert_eq!(res.status, 200, "{res:?}");
    let refresh = res.json()["refresh_token"].as_str().unwrap().to_owned();
    let (_, carol) = decode(res.json()["access_token"].as_str().unwrap());
    assert_eq!(carol["perms"], serde_json::json!(carol_v2));

    // A subject no longer in the file is removed, with its logins.
    let keycards_v3 = ["ticketing:*:view:ticket"];
    write_grants(&file, &entry("clients", "keycards", &keycards_v3));
    eventually("keycards' third grants", || async {
        auth.client_claims("keycards", "password").await["perms"] == serde_json::json!(keycards_v3)
    })
    .await;
    assert_eq!(auth.login("carol", "password").await.status, 400);
    let res = auth.refresh(&refresh).await;
    assert_eq!(res.json()["error"], "invalid_grant", "{res:?}");
    auth.stop().await;

    // Without a grants file nothing is applied: the subjects stay.
    let auth = start_with(&dir, |s| s.seed_demo = false).await;
    assert_eq!(
        auth.client_claims("keycards", "password").await["perms"],
        serde_json::json!(keycards_v3)
    );
    auth.stop().await;
}

#[tokio::test]
async fn a_bad_change_of_the_grants_file_keeps_the_last_good_grants() {
    let dir = Data::new("badchange");
    let file = dir.path().join("grants.toml");
    write_grants(
        &file,
        &entry("clients", "keycards", &["ticketing:*:view:ticket"]),
    );
    let auth = start_with(&dir, from_file(&file)).await;
    let rejected = || auth.counter("auth_grants_file_rejected_total", "");
    let before = rejected().await;
    let grants_check = || async {
        let res = send(Method::GET, &auth.url("/health/ready"), &[], "").await;
        (
            res.status,
            res.json()["checks"]["grants-file"]["status"].clone(),
        )
    };
    // The checks' first runs.
    eventually("readiness", || async {
        grants_check().await == (StatusCode::OK, "up".into())
    })
    .await;

    // Three problems: the whole change is refused.
    write_grants(
        &file,
        "[clients.keycards]\nsecret = \"literal\"\ngrants = [\"ticketing:*:view\"]\n\n\
         [users.dave]\ngrants = []\n",
    );
    eventually("the refusal counted", || async {
        rejected().await > before
    })
    .await;
    // Readiness does not depend on the file.
    eventually("the readiness check down", || async {
        grants_check().await == (StatusCode::OK, "down".into())
    })
    .await;
    let claims = auth.client_claims("keycards", "password").await;
    assert_eq!(
        claims["perms"],
        serde_json::json!(["ticketing:*:view:ticket"]),
        "the last good grants stay"
    );
    assert_eq!(auth.login("dave", "password").await.status, 400);

    // Fixed: applied.
    write_grants(
        &file,
        &entry("clients", "keycards", &["mail::send:message"]),
    );
    eventually("the fixed file applied", || async {
        auth.client_claims("keycards", "password").await["perms"]
            == serde_json::json!(["mail::send:message"])
    })
    .await;
    eventually("the readiness check up", || async {
        grants_check().await == (StatusCode::OK, "up".into())
    })
    .await;
    auth.stop().await;
}

#[tokio::test]
async fn the_admin_api_needs_its_permissions_and_changes_the_next_token() {
    let dir = Data::new("admin");
    // The demo grants: admin holds auth::view:grant, auth::manage:grant and
    // auth::register:client; alice none of them.
    let auth = start(&dir).await;
    let alice = auth.access_token("alice").await;
    let admin = auth.access_token("admin").await;
    let calls = [
        (Method::GET, "/auth/v1/clients/orders/grants", ""),
        (Method::GET, "/auth/v1/users/alice/grants", ""),
        (
            Method::PUT,
            "/auth/v1/clients/orders/grants",
            r#"{"grants": []}"#,
        ),
        (
            Method::PUT,
            "/auth/v1/users/alice/grants",
            r#"{"grants": []}"#,
        ),
        (
            Method::POST,
            "/auth/v1/clients",
            r#"{"client_id": "keycards", "grants": []}"#,
        ),
    ];
    for (method, path, body) in &calls {
        let res = auth.admin(method.clone(), path, None, body).await;
        assert_eq!(res.status, 401, "{method} {path}: {res:?}");
        let res = auth.admin(method.clone(), path, Some(&alice), body).await;
        assert_eq!(res.status, 403, "{method} {path}: {res:?}");
        assert_eq!(res.header("content-type"), "application/problem+json");
        assert!(res.json()["correlation_id"].is_string());
    }
    assert_eq!(
        auth.login("alice", "alice-password").await.json()["access_token"]
            .as_str()
            .map(|t| decode(t).1["perms"].clone()),
        Some(serde_json::json!(ALICE_GRANTS)),
        "nothing changed"
    );

    // A new service registered through the API: its secret is in the answer.
    let res = auth
        .admin(
            Method::POST,
            "/auth/v1/clients",
            Some(&admin),
            r#"{"client_id": "keycards", "grants": ["ticketing:*:view:ticket"]}"#,
        )
        .await;
    assert_eq!(res.status, 201, "{res:?}");
    assert_eq!(res.header("cache-control"), "no-store");
    let secret = res.json()["client_secret"].as_str().unwrap().to_owned();
    let claims = auth.client_claims("keycards", &secret).await;
    assert_eq!(
        claims["perms"],
        serde_json::json!(["ticketing:*:view:ticket"])
    );
    let res = auth
        .admin(
            Method::POST,
            "/auth/v1/clients",
            Some(&admin),
            r#"{"client_id": "keycards", "grants": []}"#,
        )
        .await;
    assert_eq!(res.status, 409, "{res:?}");
    assert_eq!(res.json()["reason"], "exists");

    // Its grants replaced: in its next token.
    let new = ["ticketing:*:view:ticket", "!ticketing:vip:view:ticket"];
    let res = auth
        .admin(
            Method::PUT,
            "/auth/v1/clients/keycards/grants",
            Some(&admin),
            &serde_json::json!({ "grants": new }).to_string(),
        )
        .await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(res.json()["managed_by"], "api");
    assert_eq!(
        auth.client_claims("keycards", &secret).await["perms"],
        serde_json::json!(new)
    );
    let res = auth
        .admin(
            Method::GET,
            "/auth/v1/clients/keycards/grants",
            Some(&admin),
            "",
        )
        .await;
    assert_eq!(
        res.json(),
        serde_json::json!({"kind": "client", "name": "keycards", "grants": new, "managed_by": "api"})
    );

    // The file (here the demo grants) is authoritative for what it names.
    let res = auth
        .admin(
            Method::PUT,
            "/auth/v1/clients/orders/grants",
            Some(&admin),
            r#"{"grants": []}"#,
        )
        .await;
    assert_eq!(res.status, 409, "{res:?}");
    assert_eq!(res.json()["reason"], "managed_by_file");
    let res = auth
        .admin(Method::GET, "/auth/v1/users/alice/grants", Some(&admin), "")
        .await;
    assert_eq!(res.json()["managed_by"], "file");
    assert_eq!(res.json()["grants"], serde_json::json!(ALICE_GRANTS));

    // A user the file does not name.
    auth.add_subject(&dir, false, "dave", &[]).await;
    let res = auth
        .admin(
            Method::PUT,
            "/auth/v1/users/dave/grants",
            Some(&admin),
            r#"{"grants": ["orders:acme:view:order"]}"#,
        )
        .await;
    assert_eq!(res.status, 200, "{res:?}");
    let (_, dave) = decode(&auth.access_token_of("dave", "password").await);
    assert_eq!(dave["perms"], serde_json::json!(["orders:acme:view:order"]));

    // Bad input: every invalid field named; unknown subjects are 404.
    let res = auth
        .admin(
            Method::POST,
            "/auth/v1/clients",
            Some(&admin),
            r#"{"client_id": "bad id", "grants": ["nope", "!ticketing:acme:view"]}"#,
        )
        .await;
    assert_eq!(res.status, 422, "{res:?}");
    assert_eq!(res.json()["reason"], "invalid_fields");
    let body = res.json();
    let pointers: Vec<&str> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["pointer"].as_str().unwrap())
        .collect();
    assert_eq!(
        pointers,
        ["#/client_id", "#/grants/0", "#/grants/1"],
        "{res:?}"
    );
    let res = auth
        .admin(
            Method::PUT,
            "/auth/v1/users/dave/grants",
            Some(&admin),
            r#"{"grants": "orders:acme:view:order"}"#,
        )
        .await;
    assert_eq!(res.status, 422, "{res:?}");
    for path in [
        "/auth/v1/clients/nobody/grants",
        "/auth/v1/users/nobody/grants",
    ] {
        let res = auth.admin(Method::GET, path, Some(&admin), "").await;
        assert_eq!(res.status, 404, "{res:?}");
    }
    auth.stop().await;
}
